"""One real stack for the hostile-input suite: datastore, inference (the sample app, CPU) and
the gateway, in-process on loopback ports, plus a planted secret file no answer may ever hold."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from labelgrid.inference.v1 import inference_service_pb2_grpc as inf_grpc

from tests.fixtures.gateway import GatewayStack, real_inference
from tests.fixtures.hostile import BASE_IMAGE, Hostile, nifti


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
        answer = client.put("/datastore/image", params={"image": BASE_IMAGE}, files={"file": ("base.nii.gz", nifti())})
        assert answer.status_code == 200, answer.text
        yield Hostile(
            stack,
            client,
            ds_grpc.DatastoreServiceStub(ds_channel),
            inf_grpc.InferenceServiceStub(inf_channel),
            secret_path,
            secret,
        )
    finally:
        client.close()
        ds_channel.close()
        inf_channel.close()
        stack.stop()
