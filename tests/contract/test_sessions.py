"""Sessions (CreateSession, GetSession, DownloadSession, DeleteSession) on every backend.

The datastore runs on a manual clock: expiry is tested by moving it, never by waiting.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc

from services.datastore.settings import DatastoreSettings
from tests.contract.helpers import CHUNK, error_reason, nifti_bytes, sha256, struct, upload_image
from tests.fixtures.datastore import RunningDatastore, start_datastore

pytestmark = pytest.mark.timeout(120)

PER_CLIENT, TOTAL, MAX_EXPIRY = 3, 5, 600


class ManualClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def expect_error(awaitable: Any, code: grpc.StatusCode, reason: str, *, message_part: str = "") -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    assert caught.value.code() == code, caught.value.details()
    assert error_reason(caught.value) == reason, caught.value.details()
    assert message_part in (caught.value.details() or "")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def server(datastore_settings: DatastoreSettings, clock: ManualClock) -> AsyncIterator[RunningDatastore]:
    settings = datastore_settings.model_copy(
        update={
            "sessions_per_client": PER_CLIENT,
            "sessions_max": TOTAL,
            "session_expiry": MAX_EXPIRY,
            "session_purge_seconds": 3600.0,  # the tests purge by hand
        }
    )
    running = await start_datastore(settings, clock=clock)
    yield running
    await running.service.stop(0)


@pytest.fixture
async def stub(server: RunningDatastore) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield pb_grpc.DatastoreServiceStub(channel)


async def _stream(header: pb.CreateSessionHeader, data: bytes, digest: str | None) -> AsyncIterator[Any]:
    yield pb.CreateSessionRequest(header=header)
    for start in range(0, len(data), CHUNK):
        yield pb.CreateSessionRequest(chunk=data[start : start + CHUNK])
    if digest is not None:
        yield pb.CreateSessionRequest(finish=common_pb2.UploadFinish(sha256=digest))


async def create(
    stub: Any,
    data: bytes | None = None,
    *,
    owner: str = "client:a",
    file_name: str = "volume.nii.gz",
    expiry: int = 0,
    meta: dict[str, Any] | None = None,
    digest: str | None = "auto",
) -> Any:
    data = nifti_bytes() if data is None else data
    header = pb.CreateSessionHeader(
        file_name=file_name, owner=owner, expiry_seconds=expiry, meta=struct(meta), size_bytes=len(data)
    )
    response = await stub.CreateSession(_stream(header, data, sha256(data) if digest == "auto" else digest))
    return response.session


async def read_all(stub: Any, name: str) -> tuple[Any, bytes]:
    info, body = None, b""
    async for message in stub.DownloadSession(pb.DownloadSessionRequest(name=name)):
        if message.WhichOneof("payload") == "info":
            info = message.info
        else:
            body += message.chunk
    return info, body


def session_files(server: RunningDatastore) -> list[str]:
    return sorted(blob.key for blob in server.datastore.blobs.list("sessions/"))


async def test_create_get_download_delete(stub: Any, server: RunningDatastore, clock: ManualClock) -> None:
    data = nifti_bytes(seed=3)
    session = await create(stub, data, expiry=60, meta={"k": "v"})
    assert str(uuid.UUID(session.session_id)) == session.session_id
    assert session.name == f"sessions/{session.session_id}"
    assert (session.owner, session.file_name, session.size_bytes, session.sha256) == (
        "client:a", "volume.nii.gz", len(data), sha256(data),
    )  # fmt: skip
    assert session.expiry_seconds == 60 and dict(session.meta) == {"k": "v"}
    assert session.expire_time.seconds - session.last_access_time.seconds == 60

    got = (await stub.GetSession(pb.GetSessionRequest(name=session.name))).session
    assert got == session
    info, body = await read_all(stub, session.name)
    assert body == data and info.sha256 == sha256(data) and info.file_name == "volume.nii.gz"

    # Sessions are not images: no listing, count or export shows them.
    assert (await stub.GetStatus(pb.GetStatusRequest())).total == 0
    assert list((await stub.ListImages(pb.ListImagesRequest())).images) == []
    exported = b"".join([m.chunk async for m in stub.ExportDatastoreJson(pb.ExportDatastoreJsonRequest())])
    assert session.session_id.encode() not in exported

    deleted = (await stub.DeleteSession(pb.DeleteSessionRequest(name=session.name))).session
    assert deleted.session_id == session.session_id
    assert session_files(server) == []
    for call in (
        stub.GetSession(pb.GetSessionRequest(name=session.name)),
        stub.DeleteSession(pb.DeleteSessionRequest(name=session.name)),
        read_all(stub, session.name),
    ):
        await expect_error(call, grpc.StatusCode.NOT_FOUND, "NOT_FOUND")


async def test_expiry_touch_and_purge(stub: Any, server: RunningDatastore, clock: ManualClock) -> None:
    short = await create(stub, expiry=60)
    capped = await create(stub, expiry=10 * MAX_EXPIRY)
    assert capped.expiry_seconds == MAX_EXPIRY  # more than the datastore's longest: its longest
    assert (await create(stub, owner="b")).expiry_seconds == MAX_EXPIRY  # 0: the longest

    clock.now += 50
    touched = (await stub.GetSession(pb.GetSessionRequest(name=short.name, touch=True))).session
    assert touched.last_access_time.seconds == int(clock.now)
    assert touched.expire_time.seconds == int(clock.now) + 60  # pushed back by its lifetime
    assert touched.create_time == short.create_time

    clock.now += 59
    assert (await stub.GetSession(pb.GetSessionRequest(name=short.name))).session.session_id == short.session_id
    clock.now += 1  # exactly at expire_time: gone, at once, before any purge
    for call in (
        stub.GetSession(pb.GetSessionRequest(name=short.name)),
        stub.GetSession(pb.GetSessionRequest(name=short.name, touch=True)),
        stub.DeleteSession(pb.DeleteSessionRequest(name=short.name)),
        read_all(stub, short.name),
    ):
        await expect_error(call, grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    assert len(session_files(server)) == 3  # still stored until the purge

    assert await asyncio.to_thread(server.datastore.purge_sessions) == 1
    assert len(session_files(server)) == 2
    clock.now += MAX_EXPIRY
    assert await asyncio.to_thread(server.datastore.purge_sessions) == 2
    assert session_files(server) == []
    assert await asyncio.to_thread(server.datastore.purge_sessions) == 0


async def test_caps_per_client_and_in_total(stub: Any, server: RunningDatastore, clock: ManualClock) -> None:
    mine = [await create(stub, owner="alice", expiry=100) for _ in range(PER_CLIENT)]
    await expect_error(
        create(stub, owner="alice"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RESOURCE_EXHAUSTED",
        message_part="this client",
    )
    await create(stub, owner="bob")
    await create(stub, owner="carol")
    await expect_error(
        create(stub, owner="dave"), grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", message_part="limit is 5"
    )
    assert len(session_files(server)) == TOTAL  # nothing stored for the refused ones
    await stub.DeleteSession(pb.DeleteSessionRequest(name=mine[0].name))
    await create(stub, owner="alice")  # a place freed, for alice and in all
    clock.now += 100  # alice's two others expire: their places are free before any purge
    await create(stub, owner="alice")
    await create(stub, owner="dave")


async def test_concurrent_creates_never_overshoot_the_caps(stub: Any, server: RunningDatastore) -> None:
    data = nifti_bytes()
    results = await asyncio.gather(
        *(create(stub, data, owner=f"client:{i % 2}") for i in range(12)), return_exceptions=True
    )
    created = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) + len(refused) == 12, [r for r in results if isinstance(r, BaseException)]
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert len(created) == TOTAL
    per_owner = {owner: sum(1 for s in created if s.owner == owner) for owner in ("client:0", "client:1")}
    assert max(per_owner.values()) <= PER_CLIENT
    assert len(session_files(server)) == TOTAL


@pytest.mark.parametrize(
    "name",
    ["sessions/../../etc", "sessions/a/b", "sessions/not-a-uuid", "images/x", "sessions/", "", "sessions/..",
     f"sessions/{str(uuid.uuid4()).upper()}"],
)  # fmt: skip
async def test_malformed_names_are_invalid(stub: Any, name: str) -> None:
    for call in (
        stub.GetSession(pb.GetSessionRequest(name=name)),
        stub.DeleteSession(pb.DeleteSessionRequest(name=name)),
        read_all(stub, name),
    ):
        await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")


async def test_unknown_session_is_not_found(stub: Any) -> None:
    name = f"sessions/{uuid.uuid4()}"
    await expect_error(stub.GetSession(pb.GetSessionRequest(name=name)), grpc.StatusCode.NOT_FOUND, "NOT_FOUND")


@pytest.mark.parametrize(
    "file_name,data",
    [
        ("text.nii.gz", b"this is not a volume\n" * 10),
        ("truncated.nii.gz", nifti_bytes((32, 32, 32))[:-50]),
        ("notes.txt", b"hello"),
        ("", b"hello"),
    ],
)
async def test_corrupt_or_unknown_files_store_nothing(
    stub: Any, server: RunningDatastore, file_name: str, data: bytes
) -> None:
    await expect_error(create(stub, data, file_name=file_name), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert session_files(server) == []
    assert not any(Path(server.datastore.blobs.spool_dir()).iterdir())


async def test_bad_streams(stub: Any, server: RunningDatastore) -> None:
    data = nifti_bytes()
    await expect_error(create(stub, data, digest="0" * 64), grpc.StatusCode.INVALID_ARGUMENT, "CHECKSUM_MISMATCH")
    await expect_error(create(stub, data, digest=None), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    await expect_error(create(stub, data, expiry=-1), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    too_big = pb.CreateSessionHeader(file_name="a.nii.gz", size_bytes=server.settings.max_upload_bytes + 1)
    await expect_error(
        stub.CreateSession(_stream(too_big, b"", None)), grpc.StatusCode.RESOURCE_EXHAUSTED, "PAYLOAD_TOO_LARGE"
    )
    assert session_files(server) == []


async def test_start_purges_old_gateway_sessions_and_orphans(
    datastore_settings: DatastoreSettings, clock: ManualClock
) -> None:
    """Sessions are ephemeral: a restart drops the gateway's old `session-*` images and records,
    expired sessions and session files without a row."""
    first = await start_datastore(datastore_settings, clock=clock)
    try:
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = pb_grpc.DatastoreServiceStub(channel)
            old = str(uuid.uuid4())
            await upload_image(stub, nifti_bytes(), "x.nii.gz", image_id=f"session-{old}", info={"session": True})
            await upload_image(stub, nifti_bytes(), "kept.nii.gz")
            await stub.PutRecord(pb.PutRecordRequest(name=f"records/sessions/{old}", data=struct({"expiry": 1})))
            live = await create(stub, expiry=100)
            await create(stub, expiry=10)
        orphan = Path(first.datastore.blobs.spool_dir()) / "orphan"
        orphan.write_bytes(nifti_bytes())
        first.datastore.blobs.put_file(f"sessions/{uuid.uuid4()}.nii.gz", orphan, sha256=sha256(orphan.read_bytes()))
    finally:
        await first.service.stop(0)
    clock.now += 50
    second = await start_datastore(datastore_settings, clock=clock)
    try:
        assert session_files(second) == [f"sessions/{live.session_id}.nii.gz"]
        async with grpc.aio.insecure_channel(second.address) as channel:
            stub = pb_grpc.DatastoreServiceStub(channel)
            images = (await stub.ListImages(pb.ListImagesRequest())).images
            assert [image.image_id for image in images] == ["kept"]
            records = await stub.ListRecords(pb.ListRecordsRequest(parent="records/sessions"))
            assert list(records.records) == []
            assert (await stub.GetSession(pb.GetSessionRequest(name=live.name))).session.session_id == live.session_id
    finally:
        await second.service.stop(0)
