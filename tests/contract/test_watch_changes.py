"""WatchChanges: the datastore pushes its change generation (the gateway keeps its hot answers
under it, see gateway.changes), and the stream ends when the server stops."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2 as pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc

from gateway.changes import ChangeWatch
from services.datastore.adapters.index import SqlIndex
from tests.contract.helpers import nifti_bytes, struct, upload_image, upload_label
from tests.fixtures.datastore import RunningDatastore
from tests.fixtures.polling import eventually

WAIT = 30.0  # poll-until bound of one push; a push comes in milliseconds


@pytest.mark.parametrize("datastore_settings", ["local-sqlite"], indirect=True)
async def test_every_write_pushes_a_new_generation(stub: pb_grpc.DatastoreServiceStub) -> None:
    call = stub.WatchChanges(pb.WatchChangesRequest())
    first = await asyncio.wait_for(call.read(), WAIT)
    assert first.exclusive  # SQLite: this datastore sees every write
    seen = [first.generation]

    async def next_generation() -> int:
        message = await asyncio.wait_for(call.read(), WAIT)
        while message.generation == seen[-1]:  # a heartbeat (the generation repeated)
            message = await asyncio.wait_for(call.read(), WAIT)
        assert message.generation not in seen, "a write must change the generation"
        seen.append(message.generation)
        return message.generation

    await upload_image(stub, nifti_bytes(), image_id="a")
    await next_generation()
    await upload_label(stub, "a", nifti_bytes(dtype="uint8"))
    await next_generation()
    await stub.UpdateImageInfo(pb.UpdateImageInfoRequest(name="images/a", info=struct({"x": 1})))
    await next_generation()
    await stub.DeleteImage(pb.DeleteImageRequest(name="images/a"))
    await next_generation()
    call.cancel()


@pytest.mark.parametrize("datastore_settings", ["local-postgres"], indirect=True)
async def test_a_shared_index_pushes_other_replicas_writes(
    datastore_server: RunningDatastore, stub: pb_grpc.DatastoreServiceStub
) -> None:
    """Replicas share PostgreSQL: their writes reach this datastore as notifications (LISTEN /
    NOTIFY), so the stream is exclusive (answers may be kept) and pushes them too."""
    call = stub.WatchChanges(pb.WatchChangesRequest())
    first = await asyncio.wait_for(call.read(), WAIT)
    while not first.exclusive:  # the index's LISTEN connection is still opening
        first = await asyncio.wait_for(call.read(), WAIT)
    before = (await stub.GetStatus(pb.GetStatusRequest())).total
    # Another replica: its own index on the same database, writing behind this one's back.
    other = SqlIndex(str(datastore_server.settings.index))
    try:
        await asyncio.to_thread(other.upsert_image, "from-another-replica", ".nii.gz", "0" * 64, 1)
        message = await asyncio.wait_for(call.read(), WAIT)
        while message.generation == first.generation:  # a heartbeat
            message = await asyncio.wait_for(call.read(), WAIT)
        assert message.exclusive
        # What this datastore answers from memory is not from before that write.
        assert (await stub.GetStatus(pb.GetStatusRequest())).total == before + 1
    finally:
        other.close()
        call.cancel()


@pytest.mark.parametrize("datastore_settings", ["local-sqlite"], indirect=True)
async def test_stopping_ends_the_stream_and_the_gateway_keeps_nothing(datastore_server: RunningDatastore) -> None:
    async with grpc.aio.insecure_channel(datastore_server.address) as channel:
        stub = pb_grpc.DatastoreServiceStub(channel)
        watch = ChangeWatch()
        watch.start(stub, ())
        await asyncio.wait_for(watch.connected.wait(), WAIT)
        token = watch.token()
        assert token is not None
        watch.put("k", token, b"{}")
        assert watch.get("k") == b"{}"
        # A write through this gateway drops what was kept, before any push arrives.
        watch.wrote()
        assert watch.get("k") is None
        watch.put("k", token, b"{}")  # read under the old token: not kept
        assert watch.get("k") is None
        # An answer read before a pushed change is not kept either.
        token = watch.token()
        await upload_image(stub, nifti_bytes(), image_id="b")
        await eventually(lambda: watch.token() != token, "the push of the upload", timeout=WAIT)
        watch.put("k", token, b"{}")
        assert watch.get("k") is None

        # The server ends open streams as it starts stopping (a normal end, not a cancel at
        # the end of the grace period), and a watch without a stream keeps nothing.
        plain = stub.WatchChanges(pb.WatchChangesRequest())
        await asyncio.wait_for(plain.read(), WAIT)
        watch.put("k", watch.token(), b"{}")
        assert watch.get("k") == b"{}"
        stopping = asyncio.create_task(datastore_server.service.stop(60))
        assert await asyncio.wait_for(plain.read(), WAIT) is grpc.aio.EOF
        assert await plain.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, WAIT)

        await eventually(lambda: watch.token() is None, "the watch to drop its token", timeout=WAIT, interval=0.01)
        assert watch.get("k") is None
        await watch.stop()
