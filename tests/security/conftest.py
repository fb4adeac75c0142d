"""One real stack for the hostile-input suite: datastore, inference (the sample app, CPU) and
the gateway, in-process on loopback ports, plus a planted secret file no answer may ever hold."""

from __future__ import annotations

import gzip
import hashlib
import io
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import nibabel as nib
import numpy as np
import pytest
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from labelgrid.inference.v1 import inference_service_pb2 as inf_pb
from labelgrid.inference.v1 import inference_service_pb2_grpc as inf_grpc

from tests.integration.conftest import GatewayStack, real_inference

BASE_IMAGE = "base"


def nifti(shape: tuple[int, int, int] = (12, 10, 8)) -> bytes:
    volume = np.zeros(shape, np.uint8)
    volume[2:6, 2:6, 2:6] = 1
    return gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes())


@dataclass
class Hostile:
    """The stack, clients to every hop, and the secret planted on the server's disk."""

    stack: GatewayStack
    http: httpx.Client
    datastore: Any  # DatastoreServiceStub
    inference: Any  # InferenceServiceStub
    secret_path: Path
    secret: bytes

    def stored(self) -> set[str]:
        """Every image and label the datastore holds (sessions included)."""
        found: set[str] = set()
        token = ""
        while True:
            page = self.datastore.ListImages(ds_pb.ListImagesRequest(page_size=1000, page_token=token), timeout=10)
            for image in page.images:
                found.add(image.image_id)
                found.update(f"{image.image_id}/{tag}" for tag in image.labels)
            token = page.next_page_token
            if not token:
                return found

    def assert_alive(self) -> None:
        """Every service still answers."""
        assert self.datastore.GetStatus(ds_pb.GetStatusRequest(), timeout=10) is not None
        assert self.inference.GetAppInfo(inf_pb.GetAppInfoRequest(), timeout=10).display_name
        assert self.http.get("/datastore/", params={"output": "stats"}).status_code == 200

    def assert_no_secret(self, *answers: bytes | str) -> None:
        for answer in answers:
            data = answer.encode() if isinstance(answer, str) else answer
            assert self.secret not in data and self.secret[:16] not in data, "server-file bytes came back"


@pytest.fixture(scope="package")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("security")
    secret_path = root / "secret.txt"
    secret = secrets.token_hex(32).encode()  # 64 bytes: exactly what a 4x4x4 uint8 header asks for
    secret_path.write_bytes(secret)
    addresses: dict[str, str] = {}
    start = real_inference(root / "infer")

    async def start_inference(datastore_address: str) -> tuple[str, Any]:
        address, server = await start(datastore_address)
        addresses["inference"] = address
        return address, server

    stack = GatewayStack(root, start_inference=start_inference).start()
    ds_channel = grpc.insecure_channel(stack.datastore_address)
    inf_channel = grpc.insecure_channel(addresses["inference"])
    client = httpx.Client(base_url=stack.url, timeout=60)
    try:
        answer = client.put(
            "/datastore/image", params={"image": BASE_IMAGE}, files={"file": ("base.nii.gz", nifti())}
        )
        assert answer.status_code == 200, answer.text
        yield Hostile(
            stack, client, ds_grpc.DatastoreServiceStub(ds_channel), inf_grpc.InferenceServiceStub(inf_channel),
            secret_path, secret,
        )
    finally:
        client.close()
        ds_channel.close()
        inf_channel.close()
        stack.stop()


def upload_messages(kind: str, header: Any, data: bytes, chunk: int = 256 * 1024) -> Iterator[Any]:
    """A client stream: header, chunks, finish with the sha256 (UploadImage or InferUpload)."""
    digest = hashlib.sha256(data).hexdigest()
    if kind == "datastore":
        yield ds_pb.UploadImageRequest(header=header)
        for at in range(0, len(data), chunk):
            yield ds_pb.UploadImageRequest(chunk=data[at : at + chunk])
        yield ds_pb.UploadImageRequest(finish=common_pb2.UploadFinish(sha256=digest))
    else:
        yield inf_pb.InferUploadRequest(header=header)
        for at in range(0, len(data), chunk):
            yield inf_pb.InferUploadRequest(image_chunk=data[at : at + chunk])
        yield inf_pb.InferUploadRequest(image_finish=common_pb2.UploadFinish(sha256=digest))


def read_all(call: Any) -> bytes:
    """Everything a server stream sent, as bytes (to look for leaked file contents)."""
    out = io.BytesIO()
    for message in call:
        out.write(message.SerializeToString())
    return out.getvalue()
