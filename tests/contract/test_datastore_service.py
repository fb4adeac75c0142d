"""Every datastore RPC against every backend (local / S3 blobs x SQLite / PostgreSQL index)."""

from __future__ import annotations

import asyncio
import io
import urllib.request
import zipfile
from pathlib import Path

import grpc
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2 as pb

from tests.contract.helpers import (
    CHUNK,
    _messages,
    download,
    error_reason,
    nifti_bytes,
    sha256,
    struct,
    upload_image,
    upload_label,
    upload_model,
)
from tests.fixtures.datastore import MAX_UPLOAD, start_datastore
from tests.fixtures.polling import eventually

pytestmark = pytest.mark.timeout(120)


async def expect_error(awaitable, code: grpc.StatusCode, reason: str, *, message_part: str = "") -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    assert caught.value.code() == code, caught.value.details()
    assert error_reason(caught.value) == reason
    assert "Traceback" not in (caught.value.details() or "")
    if message_part:
        assert message_part in caught.value.details()


async def total_images(stub) -> int:
    return (await stub.GetStatus(pb.GetStatusRequest())).total


async def test_upload_get_download_roundtrip(stub):
    data = nifti_bytes((20, 16, 12))
    image = await upload_image(stub, data, "scan.v2.nii.gz", info={"client_id": "user-xyz"})
    # Without an id, MONAI Label's rule: the base name minus all its suffixes.
    assert image.image_id == "scan"
    assert image.name == "images/scan"
    assert image.ext == ".nii.gz" and image.file_name == "scan.nii.gz"
    assert image.sha256 == sha256(data) and image.size_bytes == len(data)
    info = dict(image.info)
    assert info["client_id"] == "user-xyz" and info["name"] == "scan.nii.gz" and info["ts"] > 0

    got = (await stub.GetImage(pb.GetImageRequest(name="images/scan"))).image
    assert got.sha256 == image.sha256 and got.revision == image.revision

    info_msg, body = await download(stub.DownloadImage(pb.DownloadImageRequest(name="images/scan")))
    assert body == data
    assert info_msg.sha256 == sha256(body) and info_msg.size_bytes == len(data) and info_msg.file_name == "scan.nii.gz"

    # Ranged reads, as google.bytestream does.
    _, part = await download(
        stub.DownloadImage(pb.DownloadImageRequest(name="images/scan", read_offset=10, read_limit=100))
    )
    assert part == data[10:110]
    await expect_error(
        download(stub.DownloadImage(pb.DownloadImageRequest(name="images/scan", read_offset=len(data) + 1))),
        grpc.StatusCode.OUT_OF_RANGE,
        "OUT_OF_RANGE",
    )


async def test_large_upload_is_chunked_both_ways(stub):
    data = nifti_bytes((96, 96, 96), gz=False)  # 3.4 MiB: several 1 MiB chunks
    image = await upload_image(stub, data, "big.nii")
    info, body = await download(stub.DownloadImage(pb.DownloadImageRequest(name=image.name)))
    assert body == data and info.sha256 == sha256(data)


async def test_replace_image_keeps_id_and_bumps_revision(stub):
    first = await upload_image(stub, nifti_bytes(seed=1), "a.nii.gz")
    second = await upload_image(stub, nifti_bytes(seed=2), "a.nii.gz")
    assert second.revision > first.revision and second.sha256 != first.sha256
    _, body = await download(stub.DownloadImage(pb.DownloadImageRequest(name="images/a")))
    assert body == nifti_bytes(seed=2)
    await expect_error(
        stub.UploadImage(
            _single_upload(
                nifti_bytes(seed=3), pb.UploadImageHeader(image_id="a", file_name="a.nii.gz", fail_if_exists=True)
            )
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_EXISTS",
    )


async def _single_upload(data: bytes, header: pb.UploadImageHeader):
    from labelgrid.common.v1 import common_pb2

    yield pb.UploadImageRequest(header=header)
    yield pb.UploadImageRequest(chunk=data)
    yield pb.UploadImageRequest(finish=common_pb2.UploadFinish(sha256=sha256(data)))


@pytest.mark.parametrize(
    "image_id",
    ["../escape", "/etc/passwd", "a/b", "a\\b", "nul\x00byte", "x" * 201, ".hidden", "..", "sp ace", "semi;colon"],
)
async def test_path_like_ids_are_refused_and_nothing_is_stored(stub, image_id, datastore_server):
    await expect_error(
        upload_image(stub, nifti_bytes(), "ok.nii.gz", image_id=image_id),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    assert await total_images(stub) == 0
    if datastore_server.settings.backend == "local":
        root = datastore_server.settings.root.resolve()
        assert not any(p for p in root.parent.iterdir() if p.name not in {"studies", "state"})
        assert not list((root / ".labelgrid" / "tmp").iterdir())


async def test_bad_names_and_unknown_resources(stub):
    await expect_error(
        stub.GetImage(pb.GetImageRequest(name="images/nope")), grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND"
    )
    await expect_error(
        stub.GetImage(pb.GetImageRequest(name="labels/x")), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"
    )
    await expect_error(
        stub.GetImage(pb.GetImageRequest(name="images/../x")), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"
    )
    await expect_error(
        download(stub.DownloadImage(pb.DownloadImageRequest(name="images/nope"))),
        grpc.StatusCode.NOT_FOUND,
        "IMAGE_NOT_FOUND",
    )
    await expect_error(
        stub.DeleteImage(pb.DeleteImageRequest(name="images/nope")), grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND"
    )
    await expect_error(
        stub.UpdateImageInfo(pb.UpdateImageInfoRequest(name="images/nope", info=struct({"a": 1}))),
        grpc.StatusCode.NOT_FOUND,
        "IMAGE_NOT_FOUND",
    )
    await expect_error(upload_label(stub, "nope", nifti_bytes()), grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND")
    await expect_error(
        stub.GetModel(pb.GetModelRequest(name="models/nope")), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"
    )
    await expect_error(
        stub.GetRecord(pb.GetRecordRequest(name="records/jobs/nope")), grpc.StatusCode.NOT_FOUND, "RECORD_NOT_FOUND"
    )
    await expect_error(
        stub.ListImages(pb.ListImagesRequest(page_token="garbage!")), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"
    )
    await expect_error(
        stub.ListImages(pb.ListImagesRequest(page_size=-1)), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"
    )


async def test_checksum_mismatch_stores_nothing_and_keeps_the_old_image(stub):
    original = nifti_bytes(seed=1)
    await upload_image(stub, original, "keep.nii.gz")
    await expect_error(
        upload_image(stub, nifti_bytes(seed=2), "keep.nii.gz", digest="0" * 64),
        grpc.StatusCode.INVALID_ARGUMENT,
        "CHECKSUM_MISMATCH",
    )
    await expect_error(
        upload_image(stub, nifti_bytes(seed=2), "other.nii.gz", digest="SHA256:" + "f" * 64),
        grpc.StatusCode.INVALID_ARGUMENT,
        "CHECKSUM_MISMATCH",
    )
    assert await total_images(stub) == 1
    _, body = await download(stub.DownloadImage(pb.DownloadImageRequest(name="images/keep")))
    assert body == original
    # MONAI Label's "SHA256:<hex>" form is accepted.
    image = await upload_image(
        stub, nifti_bytes(seed=3), "prefixed.nii.gz", digest="SHA256:" + sha256(nifti_bytes(seed=3))
    )
    assert image.image_id == "prefixed"


async def test_an_unverified_finish_stores_the_sha256_the_datastore_computes(stub):
    from labelgrid.common.v1 import common_pb2

    data = nifti_bytes(seed=4)

    async def stream(finish: common_pb2.UploadFinish):
        yield pb.UploadImageRequest(header=pb.UploadImageHeader(file_name="plain.nii.gz"))
        yield pb.UploadImageRequest(chunk=data)
        yield pb.UploadImageRequest(finish=finish)

    # A finish is unverified or carries a sha256: both, or neither, is refused before storing.
    for finish in (common_pb2.UploadFinish(), common_pb2.UploadFinish(sha256=sha256(data), unverified=True)):
        await expect_error(stub.UploadImage(stream(finish)), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert await total_images(stub) == 0
    image = (await stub.UploadImage(stream(common_pb2.UploadFinish(unverified=True)))).image
    assert image.sha256 == sha256(data)
    _, body = await download(stub.DownloadImage(pb.DownloadImageRequest(name="images/plain")))
    assert body == data


async def test_malformed_streams(stub):
    from labelgrid.common.v1 import common_pb2

    async def no_finish():
        yield pb.UploadImageRequest(header=pb.UploadImageHeader(file_name="x.nii.gz"))
        yield pb.UploadImageRequest(chunk=nifti_bytes())

    async def no_header():
        yield pb.UploadImageRequest(chunk=b"abc")

    async def empty():
        return
        yield  # pragma: no cover

    async def oversized_chunk():
        yield pb.UploadImageRequest(header=pb.UploadImageHeader(file_name="x.nii.gz"))
        yield pb.UploadImageRequest(chunk=b"\0" * (CHUNK + 1))
        yield pb.UploadImageRequest(finish=common_pb2.UploadFinish(sha256="0" * 64))

    for stream in (no_finish(), no_header(), empty(), oversized_chunk()):
        await expect_error(stub.UploadImage(stream), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert await total_images(stub) == 0


async def test_size_limit(stub):
    # Declared too large: refused before any byte is spooled.
    await expect_error(
        stub.UploadImage(_single_upload(b"x", pb.UploadImageHeader(file_name="x.nii.gz", size_bytes=MAX_UPLOAD + 1))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "PAYLOAD_TOO_LARGE",
    )
    # Undeclared but too large: refused when the limit is crossed.
    big = b"\0" * (MAX_UPLOAD + CHUNK)
    header = pb.UploadImageHeader(file_name="huge.nii")

    async def stream():
        yield pb.UploadImageRequest(header=header)
        for start in range(0, len(big), CHUNK):
            yield pb.UploadImageRequest(chunk=big[start : start + CHUNK])

    await expect_error(stub.UploadImage(stream()), grpc.StatusCode.RESOURCE_EXHAUSTED, "PAYLOAD_TOO_LARGE")
    assert await total_images(stub) == 0


@pytest.mark.parametrize(
    "file_name,data",
    [
        ("text.nii.gz", b"this is not a volume\n" * 10),
        ("random.nii.gz", bytes(range(256)) * 40),
        ("empty.nii.gz", b""),
        ("truncated.nii.gz", nifti_bytes((32, 32, 32))[:-50]),
        ("truncated.nii", nifti_bytes((32, 32, 32), gz=False)[:-1000]),
        ("notes.txt", b"hello"),
        ("noext", b"hello"),
    ],
)
async def test_corrupt_or_unknown_files_are_refused(stub, datastore_server, file_name, data):
    await expect_error(upload_image(stub, data, file_name), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert await total_images(stub) == 0
    if datastore_server.settings.backend == "local":
        root = datastore_server.settings.root.resolve()
        assert [
            p.name
            for p in root.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name != "datastore_v2.json"
        ] == []
        assert not list((root / ".labelgrid" / "tmp").iterdir())


async def test_client_hanging_up_mid_upload_leaves_nothing(stub, datastore_server):
    data = nifti_bytes((64, 64, 64), gz=False)
    sent_two = asyncio.Event()

    async def stream():
        yield pb.UploadImageRequest(header=pb.UploadImageHeader(file_name="gone.nii"))
        for index, start in enumerate(range(0, len(data), CHUNK)):
            yield pb.UploadImageRequest(chunk=data[start : start + CHUNK])
            if index == 1:
                sent_two.set()
                await asyncio.sleep(30)

    spool = Path(datastore_server.datastore.blobs.spool_dir())
    call = stub.UploadImage(stream())
    await asyncio.wait_for(sent_two.wait(), 10)
    # The server is receiving the upload: its spool file exists.
    await eventually(lambda: any(spool.iterdir()), "the upload to reach the server's spool", timeout=10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # The server noticed the hang-up: the spool file is gone, and no image was stored.
    await eventually(lambda: not any(spool.iterdir()), "the spool file to be removed", timeout=10)
    assert await total_images(stub) == 0


async def test_labels_status_and_filters(stub):
    for number in range(4):
        await upload_image(stub, nifti_bytes(seed=number), f"img_{number}.nii.gz")
    label = await upload_label(
        stub, "img_1", nifti_bytes((16, 16, 16), dtype="uint8"), info={"label_info": [{"name": "spleen", "idx": 1}]}
    )
    assert label.name == "images/img_1/labels/final" and label.file_name == "img_1.nii.gz"
    await upload_label(stub, "img_2", nifti_bytes(dtype="uint8"), tag="original", file_name="pred.nii.gz")
    status = await stub.GetStatus(pb.GetStatusRequest())
    assert (status.total, status.completed, dict(status.label_tags)) == (4, 1, {"final": 1, "original": 1})

    labeled = await stub.ListImages(pb.ListImagesRequest(filter=pb.IMAGE_FILTER_LABELED))
    assert [i.image_id for i in labeled.images] == ["img_1"] and labeled.total_size == 1
    assert [label.tag for label in labeled.images[0].labels] == ["final"]
    unlabeled = await stub.ListImages(pb.ListImagesRequest(filter=pb.IMAGE_FILTER_UNLABELED))
    assert [i.image_id for i in unlabeled.images] == ["img_0", "img_2", "img_3"]
    original = await stub.ListImages(pb.ListImagesRequest(filter=pb.IMAGE_FILTER_LABELED, label_tag="original"))
    assert [i.image_id for i in original.images] == ["img_2"]

    info, body = await download(stub.DownloadLabel(pb.DownloadLabelRequest(name="images/img_1/labels/final")))
    assert info.sha256 == sha256(body) and info.file_name == "img_1.nii.gz"

    updated = (
        await stub.UpdateLabelInfo(pb.UpdateLabelInfoRequest(name=label.name, info=struct({"reviewed": True})))
    ).label
    assert dict(updated.info)["reviewed"] is True and dict(updated.info)["label_info"][0]["name"] == "spleen"

    await expect_error(
        upload_label(stub, "img_1", nifti_bytes(), tag="../x"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"
    )
    await expect_error(upload_label(stub, "img_1", b"garbage" * 100), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    await stub.DeleteLabel(pb.DeleteLabelRequest(name=label.name))
    await expect_error(stub.GetLabel(pb.GetLabelRequest(name=label.name)), grpc.StatusCode.NOT_FOUND, "LABEL_NOT_FOUND")
    assert (await stub.GetStatus(pb.GetStatusRequest())).completed == 0

    await stub.DeleteImage(pb.DeleteImageRequest(name="images/img_2"))
    assert [i.image_id for i in (await stub.ListImages(pb.ListImagesRequest())).images] == ["img_0", "img_1", "img_3"]
    assert dict((await stub.GetStatus(pb.GetStatusRequest())).label_tags).get("original", 0) == 0


async def test_paging_covers_everything_once(stub):
    for number in range(7):
        await upload_image(stub, nifti_bytes((8, 8, 8), seed=number), f"p{number}.nii.gz")
    seen, token = [], ""
    while True:
        page = await stub.ListImages(pb.ListImagesRequest(page_size=3, page_token=token))
        assert page.total_size == 7
        seen += [i.image_id for i in page.images]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"p{n}" for n in range(7)]


async def test_concurrent_info_updates_are_never_lost(stub):
    await upload_image(stub, nifti_bytes(), "shared.nii.gz")
    await asyncio.gather(
        *[
            stub.UpdateImageInfo(pb.UpdateImageInfoRequest(name="images/shared", info=struct({f"key_{n}": n})))
            for n in range(24)
        ]
    )
    info = dict((await stub.GetImage(pb.GetImageRequest(name="images/shared"))).image.info)
    assert all(info[f"key_{n}"] == n for n in range(24))
    image = (await stub.GetImage(pb.GetImageRequest(name="images/shared"))).image
    await expect_error(
        stub.UpdateImageInfo(
            pb.UpdateImageInfoRequest(name="images/shared", info=struct({"x": 1}), expected_revision=image.revision - 1)
        ),
        grpc.StatusCode.ABORTED,
        "REVISION_MISMATCH",
    )


async def test_scores_and_score_order(stub):
    for number in range(3):
        await upload_image(stub, nifti_bytes(seed=number), f"s{number}.nii.gz")
    await stub.SetImageScore(pb.SetImageScoreRequest(name="images/s0", score_key="epistemic_entropy", value=0.2))
    image = (
        await stub.SetImageScore(pb.SetImageScoreRequest(name="images/s2", score_key="epistemic_entropy", value=0.9))
    ).image
    assert dict(image.info)["epistemic_entropy"] == pytest.approx(0.9)  # MONAI Label's view: in the info
    assert (await stub.GetImage(pb.GetImageRequest(name="images/s2"))).image.scores[
        "epistemic_entropy"
    ] == pytest.approx(0.9)
    ordered = await stub.ListImages(
        pb.ListImagesRequest(order=pb.IMAGE_ORDER_SCORE_DESC, score_key="epistemic_entropy")
    )
    assert [i.image_id for i in ordered.images] == ["s2", "s0", "s1"]


async def test_leases_hand_each_image_to_one_client(stub):
    for number in range(5):
        await upload_image(stub, nifti_bytes((8, 8, 8), seed=number), f"l{number}.nii.gz")
    await upload_label(stub, "l0", nifti_bytes((8, 8, 8), dtype="uint8"))
    answers = await asyncio.gather(
        *[
            stub.AcquireImageLease(pb.AcquireImageLeaseRequest(client_id=f"user-{n}", strategy="first"))
            for n in range(6)
        ]
    )
    given = [a.image.image_id for a in answers if a.image.image_id]
    assert sorted(given) == ["l1", "l2", "l3", "l4"]  # distinct, never the labeled one
    empty = [a for a in answers if not a.image.image_id]
    assert len(empty) == 2 and all(a.no_image_reason == pb.NO_IMAGE_REASON_ALL_LEASED for a in empty)

    holder = next(a for a in answers if a.image.image_id == "l1").lease.client_id
    await expect_error(
        stub.ReleaseImageLease(pb.ReleaseImageLeaseRequest(name="leases/l1", client_id="someone-else")),
        grpc.StatusCode.NOT_FOUND,
        "LEASE_NOT_FOUND",
    )
    renewed = (
        await stub.RenewImageLease(pb.RenewImageLeaseRequest(name="leases/l1", client_id=holder, ttl_seconds=120))
    ).lease
    assert renewed.expire_time.seconds > renewed.acquire_time.seconds + 100
    # Saving the final label ends the lease; the image never comes back.
    await upload_label(stub, "l1", nifti_bytes((8, 8, 8), dtype="uint8"))
    leases = (await stub.ListImageLeases(pb.ListImageLeasesRequest())).leases
    assert sorted(lease.image_id for lease in leases) == ["l2", "l3", "l4"]
    again = await stub.AcquireImageLease(pb.AcquireImageLeaseRequest(client_id="user-late", strategy="first"))
    assert again.no_image_reason == pb.NO_IMAGE_REASON_ALL_LEASED

    # A released image is handed out again.
    holder2 = next(lease for lease in leases if lease.image_id == "l2").client_id
    await stub.ReleaseImageLease(pb.ReleaseImageLeaseRequest(name="leases/l2", client_id=holder2))
    again = await stub.AcquireImageLease(pb.AcquireImageLeaseRequest(client_id="user-late", strategy="first"))
    assert again.image.image_id == "l2"
    await expect_error(
        stub.AcquireImageLease(pb.AcquireImageLeaseRequest(client_id="", strategy="first")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )


async def test_lease_reason_when_all_labeled_or_empty(stub):
    answer = await stub.AcquireImageLease(pb.AcquireImageLeaseRequest(client_id="u", strategy="first"))
    assert answer.no_image_reason == pb.NO_IMAGE_REASON_EMPTY and not answer.image.image_id
    await upload_image(stub, nifti_bytes((8, 8, 8)), "only.nii.gz")
    await upload_label(stub, "only", nifti_bytes((8, 8, 8), dtype="uint8"))
    answer = await stub.AcquireImageLease(pb.AcquireImageLeaseRequest(client_id="u", strategy="first"))
    assert answer.no_image_reason == pb.NO_IMAGE_REASON_ALL_LABELED


async def test_model_versions_pin_and_rollback(stub):
    first = await upload_model(stub, "segmentation", b"weights-1" * 1000, metrics={"best_metric": 0.5})
    second = await upload_model(stub, "segmentation", b"weights-2" * 1000, metrics={"best_metric": 0.7})
    assert (first.version, second.version) == ("v000001", "v000002")
    model = (await stub.GetModel(pb.GetModelRequest(name="models/segmentation"))).model
    assert (model.latest_version, model.serving_version, model.pinned_version) == ("v000002", "v000002", "")
    _, body = await download(
        stub.DownloadModelVersion(pb.DownloadModelVersionRequest(name="models/segmentation/versions/serving"))
    )
    assert body == b"weights-2" * 1000
    pinned = (
        await stub.PinModelVersion(pb.PinModelVersionRequest(model="models/segmentation", version="v000001"))
    ).model
    assert pinned.serving_version == "v000001"
    _, body = await download(
        stub.DownloadModelVersion(pb.DownloadModelVersionRequest(name="models/segmentation/versions/serving"))
    )
    assert body == b"weights-1" * 1000
    await expect_error(
        stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name="models/segmentation/versions/v000001")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "FAILED_PRECONDITION",
    )
    await expect_error(
        stub.PinModelVersion(pb.PinModelVersionRequest(model="models/segmentation", version="v000009")),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
    )
    await stub.PinModelVersion(pb.PinModelVersionRequest(model="models/segmentation", version=""))
    versions = (await stub.ListModelVersions(pb.ListModelVersionsRequest(parent="models/segmentation"))).model_versions
    assert [v.version for v in versions] == ["v000002", "v000001"]
    assert dict(versions[0].metrics)["best_metric"] == pytest.approx(0.7)
    await stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name="models/segmentation/versions/v000001"))
    models = (await stub.ListModels(pb.ListModelsRequest())).models
    assert [m.model_id for m in models] == ["segmentation"]


async def test_records_are_conditional(stub):
    created = (
        await stub.PutRecord(
            pb.PutRecordRequest(name="records/trainingJobs/j1", data=struct({"state": "QUEUED"}), expected_revision=-1)
        )
    ).record
    await expect_error(
        stub.PutRecord(pb.PutRecordRequest(name="records/trainingJobs/j1", data=struct({}), expected_revision=-1)),
        grpc.StatusCode.ABORTED,
        "REVISION_MISMATCH",
    )
    updated = (
        await stub.PutRecord(
            pb.PutRecordRequest(
                name="records/trainingJobs/j1", data=struct({"state": "RUNNING"}), expected_revision=created.revision
            )
        )
    ).record
    assert updated.revision > created.revision
    await expect_error(
        stub.PutRecord(
            pb.PutRecordRequest(name="records/trainingJobs/j1", data=struct({}), expected_revision=created.revision)
        ),
        grpc.StatusCode.ABORTED,
        "REVISION_MISMATCH",
    )
    listed = (await stub.ListRecords(pb.ListRecordsRequest(parent="records/trainingJobs"))).records
    assert [(r.record_id, dict(r.data)["state"]) for r in listed] == [("j1", "RUNNING")]
    # A conditional delete at a revision the record has left is refused and keeps it.
    for stale in (created.revision, updated.revision + 1):
        await expect_error(
            stub.DeleteRecord(pb.DeleteRecordRequest(name="records/trainingJobs/j1", expected_revision=stale)),
            grpc.StatusCode.ABORTED,
            "REVISION_MISMATCH",
        )
    await expect_error(
        stub.DeleteRecord(pb.DeleteRecordRequest(name="records/trainingJobs/j1", expected_revision=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    assert (
        await stub.GetRecord(pb.GetRecordRequest(name="records/trainingJobs/j1"))
    ).record.revision == updated.revision
    await stub.DeleteRecord(pb.DeleteRecordRequest(name="records/trainingJobs/j1", expected_revision=updated.revision))
    await expect_error(
        stub.DeleteRecord(pb.DeleteRecordRequest(name="records/trainingJobs/j1", expected_revision=updated.revision)),
        grpc.StatusCode.NOT_FOUND,
        "RECORD_NOT_FOUND",
    )
    await stub.PutRecord(pb.PutRecordRequest(name="records/trainingJobs/j1", data=struct({})))
    await stub.DeleteRecord(pb.DeleteRecordRequest(name="records/trainingJobs/j1"))  # 0: whatever its revision
    await expect_error(
        stub.GetRecord(pb.GetRecordRequest(name="records/trainingJobs/j1")),
        grpc.StatusCode.NOT_FOUND,
        "RECORD_NOT_FOUND",
    )


async def test_record_data_and_model_version_infos_are_capped_like_image_infos(stub):
    from services.datastore.domain.limits import MAX_INFO_BYTES

    big = {"blob": "x" * (MAX_INFO_BYTES + 1)}
    await expect_error(
        stub.PutRecord(pb.PutRecordRequest(name="records/trainingJobs/big", data=struct(big))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "PAYLOAD_TOO_LARGE",
        message_part="record data",
    )
    await expect_error(
        stub.GetRecord(pb.GetRecordRequest(name="records/trainingJobs/big")),
        grpc.StatusCode.NOT_FOUND,
        "RECORD_NOT_FOUND",
    )
    for field in ("metrics", "info"):
        header = pb.UploadModelVersionHeader(model="models/seg", file_name="model.pt", **{field: struct(big)})
        data = b"weights"
        await expect_error(
            stub.UploadModelVersion(_messages(pb.UploadModelVersionRequest, header, data, sha256(data), CHUNK)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "PAYLOAD_TOO_LARGE",
            message_part=f"model version {field}",
        )
    assert list((await stub.ListModels(pb.ListModelsRequest())).models) == []
    # Just under the cap is kept.
    fits = {"blob": "x" * (MAX_INFO_BYTES - 100)}
    await stub.PutRecord(pb.PutRecordRequest(name="records/trainingJobs/fits", data=struct(fits)))
    await upload_model(stub, "seg", b"weights", metrics={"note": "x" * (MAX_INFO_BYTES - 100)})


async def test_download_url_reads_the_blob(stub):
    data = nifti_bytes()
    await upload_image(stub, data, "url.nii.gz")
    answer = await stub.GetDownloadUrl(pb.GetDownloadUrlRequest(name="images/url", expire_seconds=60))
    assert answer.info.sha256 == sha256(data)
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(answer.url, timeout=10).read())
    assert body == data
    await expect_error(
        stub.GetDownloadUrl(pb.GetDownloadUrlRequest(name="images/url", expire_seconds=10**8)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )


async def test_download_url_for_clients_needs_a_public_endpoint(stub):
    """for_client (the gateway's download redirect) signs only for an S3 public endpoint, which
    no contract backend has: FAILED_PRECONDITION (the gateway then streams), before any lookup."""
    await upload_image(stub, nifti_bytes(), "client.nii.gz")
    for name in ("images/client", "images/missing"):
        await expect_error(
            stub.GetDownloadUrl(pb.GetDownloadUrlRequest(name=name, for_client=True)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "FAILED_PRECONDITION",
        )


async def test_download_url_for_the_edge_is_signed_where_the_datastore_reads(stub, datastore_settings):
    """for_edge (the edge fetching a download itself): on S3, a URL on the datastore's own
    endpoint that answers with the file name and media type of a download through the gateway;
    elsewhere FAILED_PRECONDITION (the gateway then streams). With for_client: INVALID_ARGUMENT."""
    data = nifti_bytes()
    await upload_image(stub, data, "edge_one.nii.gz")
    name = "images/edge_one"
    await expect_error(
        stub.GetDownloadUrl(pb.GetDownloadUrlRequest(name=name, for_client=True, for_edge=True)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    request = pb.GetDownloadUrlRequest(name=name, expire_seconds=60, for_edge=True)
    if datastore_settings.backend != "s3":
        await expect_error(stub.GetDownloadUrl(request), grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION")
        return
    answer = await stub.GetDownloadUrl(request)
    assert answer.url.startswith(f"http://{datastore_settings.s3_endpoint}/{datastore_settings.s3_bucket}/")

    def fetch() -> tuple[bytes, dict[str, str]]:
        with urllib.request.urlopen(answer.url, timeout=10) as response:
            return response.read(), {key.lower(): value for key, value in response.headers.items()}

    body, headers = await asyncio.to_thread(fetch)
    assert body == data and answer.info.sha256 == sha256(data)
    assert headers["content-disposition"] == 'attachment; filename="edge_one.nii.gz"'
    assert headers["content-type"] == "application/octet-stream"  # as the gateway streams a .nii.gz
    await expect_error(
        stub.GetDownloadUrl(pb.GetDownloadUrlRequest(name="images/missing", for_edge=True)),
        grpc.StatusCode.NOT_FOUND,
        "IMAGE_NOT_FOUND",
    )


async def test_export_dataset_zip(stub):
    await expect_error(
        download(stub.ExportDataset(pb.ExportDatasetRequest())),
        grpc.StatusCode.FAILED_PRECONDITION,
        "FAILED_PRECONDITION",
    )
    for number in range(3):
        await upload_image(stub, nifti_bytes(seed=number), f"e{number}.nii.gz")
    await upload_label(stub, "e0", nifti_bytes(dtype="uint8"))
    await upload_label(stub, "e2", nifti_bytes(dtype="uint8"))
    info, body = await download(stub.ExportDataset(pb.ExportDatasetRequest()))
    assert info.sha256 == sha256(body)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        names = sorted(archive.namelist())
        assert names == ["image/e0.nii.gz", "image/e2.nii.gz", "label/e0.nii.gz", "label/e2.nii.gz", "metadata.json"]
        assert archive.read("image/e2.nii.gz") == nifti_bytes(seed=2)


async def test_restart_loses_nothing(datastore_server, datastore_settings):
    async with grpc.aio.insecure_channel(datastore_server.address) as channel:
        from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc

        stub = pb_grpc.DatastoreServiceStub(channel)
        data = nifti_bytes()
        await upload_image(stub, data, "persist.nii.gz", info={"client_id": "a"})
        await upload_label(stub, "persist", nifti_bytes(dtype="uint8"))
        await upload_model(stub, "seg", b"w" * 10)
    await datastore_server.service.stop(0)

    restarted = await start_datastore(datastore_settings)
    try:
        async with grpc.aio.insecure_channel(restarted.address) as channel:
            from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc

            stub = pb_grpc.DatastoreServiceStub(channel)
            image = (await stub.GetImage(pb.GetImageRequest(name="images/persist"))).image
            assert dict(image.info)["client_id"] == "a" and [label.tag for label in image.labels] == ["final"]
            _, body = await download(stub.DownloadImage(pb.DownloadImageRequest(name="images/persist")))
            assert body == data
            assert (await stub.GetModel(pb.GetModelRequest(name="models/seg"))).model.latest_version == "v000001"
    finally:
        await restarted.service.stop(0)


async def test_reindex_adopts_files_added_behind_its_back(stub, datastore_server):
    ds = datastore_server.datastore
    await upload_image(stub, nifti_bytes(seed=1), "known.nii.gz")
    # Write a file straight into the store, as a person copying files into a folder or bucket would.
    data = nifti_bytes(seed=7)
    spool = Path(ds.blobs.spool_dir()) / "drop.tmp"
    spool.write_bytes(data)
    await asyncio.to_thread(ds.blobs.put_file, "images/dropped.nii.gz", spool, sha256=sha256(data))
    await asyncio.to_thread(ds.blobs.delete, "images/known.nii.gz")
    # A file that fails the format check is left out, and the answer says which and why.
    junk = Path(ds.blobs.spool_dir()) / "junk.tmp"
    junk.write_bytes(b"not a gzip stream at all")
    await asyncio.to_thread(ds.blobs.put_file, "images/junk.nii.gz", junk, sha256=sha256(b"not a gzip stream at all"))
    counts = await stub.Reindex(pb.ReindexRequest())
    assert counts.images == 1 and counts.removed == 1
    assert counts.skipped == 1 and len(counts.skipped_files) == 1
    assert counts.skipped_files[0].startswith("images/junk.nii.gz: "), counts.skipped_files
    image = (await stub.GetImage(pb.GetImageRequest(name="images/dropped"))).image
    assert image.sha256 == sha256(data)
    await expect_error(
        stub.GetImage(pb.GetImageRequest(name="images/known")), grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND"
    )


async def test_datastore_info(stub, datastore_settings):
    info = await stub.GetDatastoreInfo(pb.GetDatastoreInfoRequest())
    assert info.backend == datastore_settings.backend
    assert info.display_name == "new-dataset" and info.status.total == 0
