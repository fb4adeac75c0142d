"""The inference service against a real datastore, both in-process on loopback ports.

No mocks: images, labels and model versions go through the datastore's gRPC API, and
every call reaches the inference service over a real channel with its interceptors.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nibabel as nib
import nrrd
import numpy as np
import pytest
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as ds
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from labelgrid.inference.v1 import inference_service_pb2 as pb
from labelgrid.inference.v1 import inference_service_pb2_grpc as pb_grpc
from labelgrid.inference.v1 import resources_pb2 as res

from services.common.apps import load_app
from services.common.models.volumes import nrrd_affine
from services.common.server import GrpcService
from services.datastore.sample_studies import write_sample_studies
from services.datastore.settings import DatastoreSettings
from services.infer.domain.inference import Inference
from services.infer.domain.scheduler import DeviceQueue
from tests.contract.helpers import error_reason, struct, upload_image, upload_label, upload_model
from tests.fixtures.datastore import RunningDatastore, start_datastore
from tests.fixtures.inference import constant_class_weights, infer_request, start_inference
from tests.fixtures.polling import eventually

AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.5, 0, 5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])
SHAPE = (40, 36, 32)


def sphere_image(shape: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    data = rng.normal(0, 0.1, shape).astype(np.float32)
    data[np.linalg.norm(grid - np.array(shape) / 2, axis=-1) < min(shape) / 4] += 1.0
    return gzip.compress(nib.Nifti1Image(data, AFFINE).to_bytes(), compresslevel=1, mtime=0)


@dataclass
class Stack:
    datastore: RunningDatastore
    ds_stub: ds_grpc.DatastoreServiceStub
    infer: GrpcService
    inference: Inference
    stub: pb_grpc.InferenceServiceStub
    channels: list[grpc.aio.Channel]
    closers: list[Any]


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="labelgrid-infer-") as tmp:
        root = Path(tmp)
        datastore = await start_datastore(
            DatastoreSettings(port=0, metrics_port=-1, backend="local", root=root / "studies", state_dir=root / "state")
        )
        ds_channel = grpc.aio.insecure_channel(datastore.service.address)
        ds_stub = ds_grpc.DatastoreServiceStub(ds_channel)
        await upload_image(ds_stub, sphere_image(SHAPE, 1), "spheres_1.nii.gz", image_id="spheres_1")
        await upload_image(ds_stub, sphere_image((24, 24, 24), 2), "spheres_2.nii.gz", image_id="spheres_2")
        service, inference, _client = await start_inference(datastore.service.address, root / "infer")
        channel = grpc.aio.insecure_channel(service.address)
        yield Stack(
            datastore, ds_stub, service, inference, pb_grpc.InferenceServiceStub(channel), [channel, ds_channel], []
        )
        for ch in (channel, ds_channel):
            await ch.close()
        await service.stop(0)
        await datastore.service.stop(0)


async def read_result(call: Any) -> tuple[pb.InferResultHeader, bytes]:
    header = None
    body = io.BytesIO()
    async for message in call:
        if message.WhichOneof("payload") == "header":
            assert header is None
            header = message.header
        else:
            assert header is not None and len(message.chunk) <= 1024 * 1024
            body.write(message.chunk)
    assert header is not None
    data = body.getvalue()
    if header.HasField("label"):
        assert hashlib.sha256(data).hexdigest() == header.label.sha256
        assert len(data) == header.label.size_bytes
    return header, data


def load_nifti(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


async def test_app_info_and_models(stack: Stack) -> None:
    info = await stack.stub.GetAppInfo(pb.GetAppInfoRequest())
    assert info.display_name == "radiology"
    # No app-level labels: the union of the models' labels as a list (MONAI Label's /info/ merge).
    assert dict(info.labels) == {"sphere_a": 1, "sphere_b": 2, "brain": 3} and info.labels_as_list
    models = (await stack.stub.ListModels(pb.ListModelsRequest())).models
    assert [m.model_id for m in models] == ["segmentation", "deepgrow", "deepedit", "segmentation_brain", "scribbles"]
    segmentation = models[0]
    assert segmentation.name == "models/segmentation" and segmentation.type == res.INFER_TYPE_SEGMENTATION
    assert dict(segmentation.labels) == {"sphere_a": 1, "sphere_b": 2} and segmentation.dimension == 3
    assert segmentation.model_version == ""  # untrained
    assert [d.name for d in segmentation.devices] == ["cpu"]
    deepgrow = (await stack.stub.GetModel(pb.GetModelRequest(name="models/deepgrow"))).model
    assert deepgrow.type == res.INFER_TYPE_DEEPGROW
    devices = (await stack.stub.ListDevices(pb.ListDevicesRequest())).devices
    assert devices[0].name == "cpu" and devices[0].kind == common_pb2.DEVICE_KIND_CPU
    assert devices[0].memory_total_bytes > devices[0].memory_used_bytes > 0
    assert (await stack.stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await stack.stub.ServerReady(pb.ServerReadyRequest())).ready
    meta = await stack.stub.ModelMetadata(pb.ModelMetadataRequest(name="models/deepgrow"))
    assert meta.platform == "pytorch" and list(meta.inputs[0].shape) == [-1, 3, -1, -1, -1]


async def test_infer_segmentation_nifti(stack: Stack) -> None:
    header, data = await read_result(stack.stub.Infer(infer_request("segmentation", "spheres_1"), timeout=60))
    label = load_nifti(data)
    assert label.shape == SHAPE
    np.testing.assert_allclose(label.affine, AFFINE, atol=1e-5)
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}
    assert header.label.file_name.endswith(".nii.gz") and header.device == "cpu" and header.model_version == ""
    assert dict(header.label_names) == {"sphere_a": 1, "sphere_b": 2}
    params = dict(header.result_params)
    assert dict(params["label_names"]) == {"sphere_a": 1.0, "sphere_b": 2.0}
    assert {"pre", "infer", "post", "write", "total"} <= set(params["latencies"].keys())
    assert header.latencies.total > 0 and header.latencies.infer > 0
    ready = await stack.stub.ModelReady(pb.ModelReadyRequest(name="models/segmentation"))
    assert ready.ready and list(ready.devices) == ["cpu"]
    queues = (await stack.stub.GetQueueStatus(pb.GetQueueStatusRequest(model="models/segmentation"))).queues
    assert queues[0].device == "cpu" and queues[0].waiting == 0 and queues[0].running == 0


async def test_infer_nrrd_uint8_as_slicer_asks(stack: Stack) -> None:
    request = infer_request(
        "segmentation", "spheres_1", params=struct({"result_extension": ".nrrd", "result_dtype": "uint8"})
    )
    header, data = await read_result(stack.stub.Infer(request, timeout=60))
    assert header.label.file_name.endswith(".nrrd")
    with tempfile.NamedTemporaryFile(suffix=".nrrd") as file:
        file.write(data)
        file.flush()
        voxels, nrrd_header = nrrd.read(file.name)
    assert voxels.shape == SHAPE and voxels.dtype == np.uint8
    np.testing.assert_allclose(nrrd_affine(nrrd_header), AFFINE, atol=1e-5)


async def test_deepgrow_with_a_click(stack: Stack) -> None:
    prompt = res.Prompt(label="sphere_a", foreground=[res.VoxelPoint(i=20, j=18, k=16)])
    header, data = await read_result(
        stack.stub.Infer(
            infer_request("deepgrow", "spheres_1", prompt=prompt, result=res.ResultOptions(result_dtype="uint8"))
        )
    )
    label = np.asarray(load_nifti(data).dataobj)
    assert label.shape == SHAPE and set(np.unique(label)) <= {0, 1}
    assert dict(header.label_names) == {"sphere_a": 1}
    # MONAI Label's params JSON form of the same click gives the same result.
    _, again = await read_result(
        stack.stub.Infer(
            infer_request(
                "deepgrow",
                "spheres_1",
                params=struct({"label": "sphere_a", "foreground": [[20, 18, 16]], "result_dtype": "uint8"}),
            )
        )
    )
    np.testing.assert_array_equal(np.asarray(load_nifti(again).dataobj), label)


async def test_save_label_lands_in_the_datastore(stack: Stack) -> None:
    request = infer_request(
        "segmentation", "spheres_2", result=res.ResultOptions(save_label=True, result_dtype="uint8")
    )
    header, _ = await read_result(stack.stub.Infer(request))
    assert header.saved_label == "images/spheres_2/labels/original"
    label = (await stack.ds_stub.GetLabel(ds.GetLabelRequest(name="images/spheres_2/labels/original"))).label
    assert label.tag == "original"


async def test_infer_upload(stack: Stack) -> None:
    data = sphere_image((24, 20, 16), 3)

    async def messages() -> AsyncIterator[pb.InferUploadRequest]:
        yield pb.InferUploadRequest(
            header=pb.InferUploadHeader(
                model="models/segmentation", image_file_name="up.nii.gz", image_size_bytes=len(data)
            )
        )
        for start in range(0, len(data), 4096):
            yield pb.InferUploadRequest(image_chunk=data[start : start + 4096])
        yield pb.InferUploadRequest(image_finish=common_pb2.UploadFinish(sha256=hashlib.sha256(data).hexdigest()))

    _header, body = await read_result(stack.stub.InferUpload(messages(), timeout=60))
    label = load_nifti(body)
    assert label.shape == (24, 20, 16)
    np.testing.assert_allclose(label.affine, AFFINE, atol=1e-5)
    assert not list((stack.inference.work_dir / "uploads").glob("*")), "the upload's temp file must be gone"


async def test_upload_spools_carry_the_pid_and_a_start_removes_dead_ones(stack: Stack, tmp_path: Path) -> None:
    # An InferUpload in flight spools to upload-<pid>-*.part (the service runs in this process).
    data = sphere_image((24, 20, 16), 3)
    release = asyncio.Event()

    async def messages() -> AsyncIterator[pb.InferUploadRequest]:
        yield pb.InferUploadRequest(
            header=pb.InferUploadHeader(
                model="models/segmentation", image_file_name="up.nii.gz", image_size_bytes=len(data)
            )
        )
        yield pb.InferUploadRequest(image_chunk=data[:4096])
        await release.wait()

    uploads = stack.inference.work_dir / "uploads"
    call = stack.stub.InferUpload(messages(), timeout=60)
    try:
        await eventually(lambda: list(uploads.glob(f"upload-{os.getpid()}-*.part")), "the upload to spool")
    finally:
        call.cancel()
        release.set()
    await eventually(lambda: not list(uploads.glob("*")), "the cancelled upload's spool to go")

    # A kill -9 mid-upload leaves such a spool; a starting service removes those of processes
    # that are gone, and keeps a live process's (replicas may share the folder) and foreign files.
    planted = tmp_path / "infer" / "uploads"
    planted.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = planted / f"upload-{dead.pid}-x1y2z3.part"
    alive = planted / f"upload-{os.getppid()}-a1b2c3.part"
    foreign = planted / "upload-notapid.part"
    for path in (gone, alive, foreign):
        path.write_bytes(b"half an upload")
    service, _inference, _client = await start_inference(stack.datastore.service.address, tmp_path / "infer")
    try:
        assert not gone.exists()
        assert alive.exists() and foreign.exists()
    finally:
        await service.stop(0)


async def test_hot_reload_serves_a_published_version(stack: Stack) -> None:
    first, _ = await read_result(stack.stub.Infer(infer_request("segmentation", "spheres_2")))
    assert first.model_version == ""
    task = load_app("apps.radiology").infer_tasks["segmentation"]
    published = await upload_model(stack.ds_stub, "segmentation", constant_class_weights(task, 2))

    async def served() -> bool:
        model = (await stack.stub.GetModel(pb.GetModelRequest(name="models/segmentation"))).model
        return model.model_version == published.name

    # The served-version lookup (the one Infer uses) is cached for 0.2 s in these tests.
    await eventually(served, "the published version to be served", timeout=30)
    header, data = await read_result(stack.stub.Infer(infer_request("segmentation", "spheres_2")))
    assert header.model_version == published.name == f"models/segmentation/versions/{published.version}"
    assert np.all(np.asarray(load_nifti(data).dataobj) == 2), "the new weights must be the ones that ran"
    model = (await stack.stub.GetModel(pb.GetModelRequest(name="models/segmentation"))).model
    assert model.model_version == published.name
    meta = await stack.stub.ModelMetadata(pb.ModelMetadataRequest(name="models/segmentation"))
    assert list(meta.versions) == [published.version]


async def expect_error(call: Any, code: grpc.StatusCode, reason: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_result(call)
    assert caught.value.code() == code, caught.value.details()
    assert error_reason(caught.value) == reason
    return caught.value.details() or ""


async def _session(stack: Stack, data: bytes) -> str:
    async def stream() -> AsyncIterator[ds.CreateSessionRequest]:
        yield ds.CreateSessionRequest(header=ds.CreateSessionHeader(file_name="local.nii.gz", owner="client:t"))
        yield ds.CreateSessionRequest(chunk=data)
        yield ds.CreateSessionRequest(finish=common_pb2.UploadFinish(sha256=hashlib.sha256(data).hexdigest()))

    return (await stack.ds_stub.CreateSession(stream())).session.name


async def test_infer_on_a_session(stack: Stack) -> None:
    """A session's volume is read from the datastore by its name, "sessions/{session}"."""
    name = await _session(stack, sphere_image(SHAPE, 7))
    request = pb.InferRequest(model="models/segmentation", image=name)
    header, data = await read_result(stack.stub.Infer(request, timeout=60))
    assert load_nifti(data).shape == SHAPE and header.label.file_name.endswith(".nii.gz")
    # A session has no stored labels and cannot be saved to.
    await expect_error(
        stack.stub.Infer(pb.InferRequest(model="models/segmentation", image=name, input_label="images/x/labels/final")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    save = res.InferParams(result=res.ResultOptions(save_label=True))
    await expect_error(
        stack.stub.Infer(pb.InferRequest(model="models/segmentation", image=name, params=save)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    await stack.ds_stub.DeleteSession(ds.DeleteSessionRequest(name=name))
    await expect_error(stack.stub.Infer(request), grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    bad = pb.InferRequest(model="models/segmentation", image="sessions/../x")
    await expect_error(stack.stub.Infer(bad), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")


async def test_bad_requests(stack: Stack) -> None:
    stub = stack.stub
    await expect_error(stub.Infer(infer_request("nope", "spheres_1")), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    await expect_error(
        stub.Infer(infer_request("segmentation", "missing")), grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND"
    )
    outside = res.Prompt(foreground=[res.VoxelPoint(i=40, j=0, k=0)])
    message = await expect_error(
        stub.Infer(infer_request("deepgrow", "spheres_1", prompt=outside)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    assert "outside the image" in message
    await expect_error(
        stub.Infer(infer_request("segmentation", "spheres_1", result=res.ResultOptions(result_extension=".png"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    await expect_error(
        stub.Infer(infer_request("segmentation", "spheres_1", device="cuda:3")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetModel(pb.GetModelRequest(name="models/nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(caught.value) == "MODEL_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateBatchInferenceJob(pb.CreateBatchInferenceJobRequest())  # no model
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_batch_jobs_page_as_every_listing_does(stack: Stack) -> None:
    """ListBatchInferenceJobs pages by services.common.paging (AIP-158): a size above the
    maximum is coerced, a negative one or a token no listing returned is INVALID_ARGUMENT."""
    stub = stack.stub
    names = []
    for _ in range(3):  # each over one missing image: it fails that image and ends at once
        job = res.BatchInferenceJob(model="models/segmentation", images=["images/no-such-image"])
        created = await stub.CreateBatchInferenceJob(
            pb.CreateBatchInferenceJobRequest(batch_inference_job=job, enqueue=True)
        )
        names.append(created.batch_inference_job.name)

    async def all_ended() -> bool:
        jobs = [
            (await stub.GetBatchInferenceJob(pb.GetBatchInferenceJobRequest(name=n))).batch_inference_job for n in names
        ]
        return all(j.state in (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED) for j in jobs)

    await eventually(all_ended, "the three batch jobs to end", timeout=60, interval=0.1)
    everything = await stub.ListBatchInferenceJobs(pb.ListBatchInferenceJobsRequest(page_size=5000))
    listed = [j.name for j in everything.batch_inference_jobs]
    assert set(names) <= set(listed) and not everything.next_page_token
    first = await stub.ListBatchInferenceJobs(pb.ListBatchInferenceJobsRequest(page_size=2))
    assert len(first.batch_inference_jobs) == 2 and first.next_page_token
    rest = await stub.ListBatchInferenceJobs(
        pb.ListBatchInferenceJobsRequest(page_size=1000, page_token=first.next_page_token)
    )
    assert [
        j.name for j in [*first.batch_inference_jobs, *rest.batch_inference_jobs]
    ] == listed  # newest first, no gaps
    for bad in (pb.ListBatchInferenceJobsRequest(page_size=-1), pb.ListBatchInferenceJobsRequest(page_token="x")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListBatchInferenceJobs(bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_corrupt_uploads(stack: Stack) -> None:
    garbage = b"this is not a NIfTI file" * 100

    async def messages(digest: str, unverified: bool = False) -> AsyncIterator[pb.InferUploadRequest]:
        yield pb.InferUploadRequest(
            header=pb.InferUploadHeader(model="models/segmentation", image_file_name="bad.nii.gz")
        )
        yield pb.InferUploadRequest(image_chunk=garbage)
        yield pb.InferUploadRequest(image_finish=common_pb2.UploadFinish(sha256=digest, unverified=unverified))

    await expect_error(
        stack.stub.InferUpload(messages(hashlib.sha256(garbage).hexdigest())),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    await expect_error(
        stack.stub.InferUpload(messages("0" * 64)), grpc.StatusCode.INVALID_ARGUMENT, "CHECKSUM_MISMATCH"
    )
    # A finish is unverified or carries a sha256: both, or neither, is refused.
    for digest, unverified in ((hashlib.sha256(garbage).hexdigest(), True), ("", False)):
        await expect_error(
            stack.stub.InferUpload(messages(digest, unverified)), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"
        )
    assert not list((stack.inference.work_dir / "uploads").glob("*"))


async def test_queue_full(stack: Stack, tmp_path: Path) -> None:
    """With no room to wait, requests beyond the running one are refused with QUEUE_FULL."""
    service, _inference, _client = await start_inference(stack.datastore.service.address, tmp_path, queue_limit=0)
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            calls = [read_result(stub.Infer(infer_request("segmentation", "spheres_1"), timeout=60)) for _ in range(4)]
            results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await service.stop(0)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert any(not isinstance(r, BaseException) for r in results)
    assert refused, "at least one of four simultaneous requests must find the queue full"
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_reason(error) == "QUEUE_FULL"
        assert "queue of device cpu is full" in (error.details() or "")


async def test_scheduler_frees_slots_of_cancelled_and_late_requests() -> None:
    queue = DeviceQueue("cpu", concurrency=1, queue_limit=2)
    gate = asyncio.Event()
    release = __import__("threading").Event()
    loop = asyncio.get_running_loop()

    def blocking(cancelled: Any) -> str:
        loop.call_soon_threadsafe(gate.set)
        release.wait(10)
        return "done"

    running = asyncio.create_task(queue.run("m", blocking))
    await gate.wait()
    waiting = asyncio.create_task(queue.run("m", lambda c: "second"))
    await eventually(lambda: queue.total_waiting == 1, "the second request to wait", timeout=10)
    assert queue.waiting["m"] == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert queue.total_waiting == 0 and queue.waiting["m"] == 0
    late = asyncio.create_task(queue.run("m", lambda c: "late", deadline=loop.time() + 0.05))
    with pytest.raises(Exception) as caught:
        await late
    assert type(caught.value).__name__ == "DeadlineExceeded"
    assert queue.total_waiting == 0
    release.set()
    assert (await running)[0] == "done"
    assert (await queue.run("m", lambda c: "free again"))[0] == "free again"
    queue.shutdown()


async def test_segmentation_brain_on_the_mni152_t1(stack: Stack, tmp_path: Path) -> None:
    """The brain model on a real T1 MRI (the MNI152 template nilearn ships), through the datastore."""
    assert write_sample_studies(tmp_path, count=0, labeled=0, brain=True) == ["mni152_t1"]
    image = nib.load(tmp_path / "mni152_t1.nii.gz")
    await upload_image(
        stack.ds_stub, (tmp_path / "mni152_t1.nii.gz").read_bytes(), "mni152_t1.nii.gz", image_id="mni152_t1"
    )
    request = infer_request("segmentation_brain", "mni152_t1", result=res.ResultOptions(result_dtype="uint8"))
    header, data = await read_result(stack.stub.Infer(request, timeout=120))
    label = load_nifti(data)
    assert label.shape == image.shape == (99, 117, 95)
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-5)
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1}
    assert dict(header.label_names) == {"brain": 1} and header.model_version == ""


async def test_scribbles_from_a_stored_label(stack: Stack) -> None:
    """Infer's input_label: a label already in the datastore (here OHIF's label.bin, which the
    datastore stored as a NIfTI on the image's grid) is the scribbles input."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    sphere = np.linalg.norm(grid - np.array(SHAPE) / 2, axis=-1) < min(SHAPE) / 4
    scribbles = np.zeros(SHAPE, dtype=np.uint8)
    scribbles[18:22, 18, 16] = 3  # foreground, inside the sphere (default ids: 2 bg, 3 fg)
    scribbles[2:6, 2, 2] = 2
    await upload_label(stack.ds_stub, "spheres_1", scribbles.tobytes(order="F"), tag="strokes", file_name="label.bin")
    request = infer_request("scribbles", "spheres_1", result=res.ResultOptions(result_dtype="uint8"))
    request.input_label = "images/spheres_1/labels/strokes"
    header, data = await read_result(stack.stub.Infer(request))
    result = np.asarray(load_nifti(data).dataobj)
    assert header.label_names == {"foreground": 1}
    assert result[scribbles == 3].all() and result[sphere].mean() > 0.9
    assert result[~sphere].sum() < 0.05 * sphere.sum()  # its rim only: resampled to 2 mm and back

    other = infer_request("scribbles", "spheres_2")
    other.input_label = "images/spheres_1/labels/strokes"
    await expect_error(stack.stub.Infer(other), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    missing = infer_request("scribbles", "spheres_1")
    missing.input_label = "images/spheres_1/labels/nothing"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_result(stack.stub.Infer(missing))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    without = infer_request("scribbles", "spheres_1")
    await expect_error(stack.stub.Infer(without), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")


async def test_batch_spreads_over_replicas(stack: Stack, tmp_path: Path) -> None:
    """batch_address: a replica sends the batch's images, round robin, to every replica."""
    for number in range(3, 9):
        await upload_image(
            stack.ds_stub, sphere_image((24, 24, 24), number), f"r{number}.nii.gz", image_id=f"replica_{number}"
        )
    address = stack.datastore.service.address
    a, inference_a, _ = await start_inference(address, tmp_path / "a")
    b, inference_b, _ = await start_inference(address, tmp_path / "b")
    c, inference_c, _ = await start_inference(
        address, tmp_path / "c", batch_address=f"ipv4:{a.address},{b.address}", batch_width=4
    )
    channel = grpc.aio.insecure_channel(c.address)
    try:
        stub = pb_grpc.InferenceServiceStub(channel)
        job = res.BatchInferenceJob(
            model="models/segmentation",
            images=[f"images/replica_{n}" for n in range(3, 9)],
            params=res.InferParams(result=res.ResultOptions(label_tag="replicas")),
        )
        created = await stub.CreateBatchInferenceJob(pb.CreateBatchInferenceJobRequest(batch_inference_job=job))
        name = created.batch_inference_job.name

        async def ended() -> Any:
            got = (await stub.GetBatchInferenceJob(pb.GetBatchInferenceJobRequest(name=name))).batch_inference_job
            return got if got.state in (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED) else None

        done = await eventually(ended, "the batch job to end", timeout=120, interval=0.1)
        assert done.state == common_pb2.JOB_STATE_SUCCEEDED and done.processed_images == 6, done
        # both replicas ran images; the one holding the job ran none itself
        assert inference_a.cache.loaded("segmentation") and inference_b.cache.loaded("segmentation")
        assert not inference_c.cache.loaded("segmentation")
        label = await stack.ds_stub.GetLabel(ds.GetLabelRequest(name="images/replica_5/labels/replicas"))
        assert label.label.info["model"] == "segmentation"
    finally:
        await channel.close()
        for service in (c, b, a):
            await service.stop(0)
