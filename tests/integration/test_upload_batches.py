"""Uploads larger than the batches the upload path works in: the datastore writes and hashes
several 1 MiB chunks per worker-thread hop (WRITE_BATCH_BYTES), the gateway sends chunk
messages it built in the wire format (and an unverified finish: the REST client sent no
checksum), and the datastore reads them as views. Against a real gateway and datastore: the bytes and the sha256
arrive whole, a client that hangs up after several batches leaves nothing, and the 1 MiB chunk
limit still holds for a client that sends a bigger chunk."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator

import grpc
import httpx
import pytest
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc

from services.common.chunks import CHUNK_SIZE
from services.common.streams import WRITE_BATCH_BYTES
from tests.contract.helpers import nifti_bytes
from tests.fixtures.gateway import GatewayStack
from tests.fixtures.multipart import CONTENT_TYPE, form
from tests.fixtures.polling import wait_until

pytestmark = pytest.mark.timeout(180)

# Over two of the datastore's write batches, and not a whole number of chunks.
VOLUME = nifti_bytes((256, 256, 140), seed=31, dtype="uint8", gz=False)
assert len(VOLUME) > 2 * WRITE_BATCH_BYTES and len(VOLUME) % CHUNK_SIZE


@pytest.fixture(scope="module")
def http(gateway_stack: GatewayStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_stack.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("params_first", [True, False])
def test_a_volume_of_several_batches_arrives_whole_with_its_sha256(
    http: httpx.Client, gateway_stack: GatewayStack, params_first: bool
) -> None:
    name = f"batches{int(params_first)}"
    parts = [("params", None, b'{"n": 2}'), ("file", f"{name}.nii", VOLUME)]
    body = form(*(parts if params_first else parts[::-1]))
    pieces = (body[i : i + 300_001] for i in range(0, len(body), 300_001))  # odd network pieces
    headers = {"content-type": CONTENT_TYPE}
    answer = http.put("/datastore/image", content=pieces, headers=headers)
    assert answer.status_code == 200, answer.text
    assert http.get("/datastore/image", params={"image": name}).content == VOLUME
    assert (gateway_stack.root / "studies" / f"{name}.nii").read_bytes() == VOLUME
    digest = hashlib.sha256(VOLUME).hexdigest()
    found = http.head("/datastore/image", params={"image": name, "check_sum": f"SHA256:{digest}"})
    assert found.status_code == 200
    assert http.head("/datastore/image", params={"image": name, "check_sum": "0" * 64}).status_code == 404
    assert gateway_stack.upload_spools() == []


def test_hanging_up_after_several_batches_stores_nothing(http: httpx.Client, gateway_stack: GatewayStack) -> None:
    head = form(("params", None, b"{}"), ("file", "gone.nii", b"")).rsplit(b"\r\n--", 1)[0]
    sent = head + VOLUME[: 3 * WRITE_BATCH_BYTES]
    host, port = gateway_stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            (
                f"PUT /datastore/image?image=gone HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: {CONTENT_TYPE}\r\n"
                f"Content-Length: {len(head) + len(VOLUME) + 100}\r\n\r\n"
            ).encode()
            + sent
        )
        wait_until(
            lambda: any(path.stat().st_size >= 2 * WRITE_BATCH_BYTES for path in gateway_stack.upload_spools()),
            "the datastore to have written several batches",
        )
    wait_until(lambda: gateway_stack.upload_spools() == [], "the spool of the abandoned upload to be removed")
    assert http.get("/datastore/image/info", params={"image": "gone"}).json() == {}
    assert not (gateway_stack.root / "studies" / "gone.nii").exists()


def test_a_chunk_over_the_limit_is_refused_and_nothing_stored(gateway_stack: GatewayStack) -> None:
    options = [("grpc.max_send_message_length", 8 * CHUNK_SIZE)]
    with grpc.insecure_channel(gateway_stack.datastore_address, options=options) as channel:
        stub = pb_grpc.DatastoreServiceStub(channel)
        data = VOLUME[: 2 * CHUNK_SIZE + 1]

        def requests() -> Iterator[pb.UploadImageRequest]:
            yield pb.UploadImageRequest(header=pb.UploadImageHeader(image_id="huge", file_name="huge.nii"))
            yield pb.UploadImageRequest(chunk=data[:CHUNK_SIZE])
            yield pb.UploadImageRequest(chunk=data[CHUNK_SIZE:])  # 1 MiB + 1
            yield pb.UploadImageRequest(finish=common_pb2.UploadFinish(sha256=hashlib.sha256(data).hexdigest()))

        with pytest.raises(grpc.RpcError) as caught:
            stub.UploadImage(requests(), timeout=30)
    assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    wait_until(lambda: gateway_stack.upload_spools() == [], "the spool of the refused upload to be removed")
    assert not (gateway_stack.root / "studies" / "huge.nii").exists()
