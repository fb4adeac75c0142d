"""The upload path's shortcuts past protobuf: the gateway builds chunk messages in the wire
format itself (gateway.multipart), the datastore reads them as views of the received bytes
(services.common.streams.chunk_views), and spools are written in batches, written back to disk
as they arrive (SpoolWriter.write_many). Each must mean exactly what protobuf would."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as pb
from prometheus_client import CollectorRegistry

from gateway.clients import _message_or_wire
from gateway.multipart import _chunk_message
from services.common.chunks import CHUNK_SIZE, SpoolWriter
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.streams import ChunkMessage, chunk_tag, chunk_views
from services.datastore.adapters.blobs import LocalBlobStore, S3BlobStore
from services.datastore.adapters.index import SqlIndex
from services.datastore.adapters.metered import MeteredBlobStore
from services.datastore.adapters.metrics import DatastoreMetrics
from services.datastore.domain.datastore import Datastore

SIZES = [0, 1, 127, 128, 300, 16383, 16384, 2**21 - 1, CHUNK_SIZE]
UPLOADS = [pb.UploadImageRequest, pb.UploadLabelRequest, pb.UploadModelVersionRequest, pb.CreateSessionRequest]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("request_type", UPLOADS)
def test_the_gateway_chunk_message_is_what_protobuf_serializes(size: int, request_type: type) -> None:
    data = os.urandom(size)
    cut = size // 3
    pieces = [memoryview(data)[:cut], memoryview(data)[cut:]]
    message = _chunk_message(chunk_tag(request_type), pieces)
    assert message == request_type(chunk=data).SerializeToString()
    assert _message_or_wire(message) is message  # sent as it is
    header = request_type(finish=common_pb2.UploadFinish(sha256="ab" * 32))
    assert _message_or_wire(header) == header.SerializeToString()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("request_type", UPLOADS)
def test_a_chunk_only_message_is_read_as_a_view(size: int, request_type: type) -> None:
    data = os.urandom(size)
    read = chunk_views(request_type)(request_type(chunk=data).SerializeToString())
    assert isinstance(read, ChunkMessage)
    assert read.WhichOneof("payload") == "chunk"
    assert isinstance(read.chunk, memoryview) and bytes(read.chunk) == data


def test_every_other_message_is_parsed_by_protobuf_as_before() -> None:
    read = chunk_views(pb.UploadImageRequest)
    header = pb.UploadImageRequest(header=pb.UploadImageHeader(image_id="a", file_name="a.nii"))
    finish = pb.UploadImageRequest(finish=common_pb2.UploadFinish(sha256="ab" * 32))
    for message in (header, finish, pb.UploadImageRequest()):
        parsed = read(message.SerializeToString())
        assert isinstance(parsed, pb.UploadImageRequest) and parsed == message
    # A chunk followed by more fields: protobuf's meaning (the last of the oneof wins), not the view's.
    both = pb.UploadImageRequest(chunk=b"abc").SerializeToString() + header.SerializeToString()
    assert read(both) == pb.UploadImageRequest.FromString(both)
    assert read(both).WhichOneof("payload") == "header"
    # A chunk that says it is longer or shorter than the message is protobuf's to refuse.
    for broken in (b"\x12\x05abc", b"\x12\xff\xff\xff\xff\xff\xff"):
        with pytest.raises(DecodeError):
            read(broken)
    short = b"\x12\x01abc"  # one byte of chunk, then garbage
    with pytest.raises(DecodeError):
        pb.UploadImageRequest.FromString(short)
    with pytest.raises(DecodeError):
        read(short)


def leftovers(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


@pytest.mark.parametrize("writeback", [True, False])
def test_batches_are_written_and_hashed_in_order(tmp_path: Path, writeback: bool) -> None:
    data = os.urandom(3 * CHUNK_SIZE + 12345)
    chunks = [memoryview(data)[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]
    writer = SpoolWriter(tmp_path, max_bytes=len(data), fsync=False, writeback=writeback)
    writer.write_many(chunks[:2])
    writer.write_many([])
    writer.write_many(chunks[2:])
    spooled = writer.finish(hashlib.sha256(data).hexdigest())
    assert spooled.path.read_bytes() == data
    assert spooled.size == len(data)


def test_a_batch_over_the_cap_or_with_an_oversized_chunk_leaves_nothing(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path, max_bytes=2 * CHUNK_SIZE, writeback=True)
    with pytest.raises(ResourceExhausted):
        writer.write_many([b"x" * CHUNK_SIZE, b"y" * CHUNK_SIZE, b"z"])
    assert leftovers(tmp_path) == []
    writer = SpoolWriter(tmp_path, max_bytes=4 * CHUNK_SIZE, writeback=True)
    with pytest.raises(InvalidArgument):
        writer.write_many([b"x", memoryview(b"y" * (CHUNK_SIZE + 1))])
    assert leftovers(tmp_path) == []


def test_the_served_local_store_writes_spools_back_and_s3_spools_are_not(tmp_path: Path) -> None:
    """What the service runs: the datastore over the metered store (adapters.metrics.instrument)."""
    local = LocalBlobStore(tmp_path / "studies")
    with SqlIndex(f"sqlite:///{tmp_path / 'index.db'}") as index:
        for blobs, expected in ((local, True), (MeteredBlobStore(local, DatastoreMetrics(CollectorRegistry())), True)):
            datastore = Datastore(blobs, index, backend="local", location="here", max_upload_bytes=CHUNK_SIZE)
            spool = datastore.new_spool()
            try:
                assert spool.writeback is expected
            finally:
                spool.abort()
    assert not getattr(S3BlobStore, "spools_become_blobs", False)
