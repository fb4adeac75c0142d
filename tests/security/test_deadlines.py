"""Every gateway→service call carries a deadline, and a server that refuses a stream early is
answered with its own status (grpc issue 36066), not a 500.

The deadline test enumerates every method of every stub the gateway holds (gateway.clients),
calls each one the way a route would without a timeout, and has a real gRPC server record the
deadline it received."""

from __future__ import annotations

import ast
import asyncio
import gzip
import json
import os
import re
from pathlib import Path
from typing import Any

import grpc
import nibabel as nib
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc

from gateway.clients import GrpcClients, with_deadlines
from gateway.settings import GatewaySettings
from tests.fixtures.hostile import BASE_IMAGE, Hostile
from tests.ports import free_port

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {
    "datastore": "labelgrid.datastore.v1.DatastoreService",
    "inference": "labelgrid.inference.v1.InferenceService",
    "training": "labelgrid.training.v1.TrainingService",
    "activelearning": "labelgrid.activelearning.v1.ActiveLearningService",
}


class _Recorder(grpc.GenericRpcHandler):
    """Answers every method UNIMPLEMENTED after noting the deadline the call arrived with."""

    def __init__(self) -> None:
        self.deadlines: dict[str, float | None] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method
        service_name, name = method.strip("/").split("/")
        found = descriptor_pool.Default().FindServiceByName(service_name).FindMethodByName(name)

        async def refuse(context: grpc.aio.ServicerContext) -> None:
            self.deadlines[method] = context.time_remaining()
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "recorded")

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await refuse(context)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await refuse(context)
            yield b""  # pragma: no cover - never reached

        kinds = {
            (False, False): grpc.unary_unary_rpc_method_handler(unary),
            (False, True): grpc.unary_stream_rpc_method_handler(stream),
            (True, False): grpc.stream_unary_rpc_method_handler(unary),
            (True, True): grpc.stream_stream_rpc_method_handler(stream),
        }
        return kinds[(found.client_streaming, found.server_streaming)]


async def test_every_gateway_call_carries_a_deadline() -> None:
    recorder = _Recorder()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((recorder,))
    port = free_port()
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    address = f"127.0.0.1:{port}"
    settings = GatewaySettings(
        datastore_address=address, inference_address=address, training_address=address,
        activelearning_address=address, rpc_timeout_seconds=17.0, stream_timeout_seconds=5000.0,
    )  # fmt: skip
    clients = GrpcClients.open(settings)
    called: dict[str, bool] = {}
    try:
        for attribute, service_name in SERVICES.items():
            stub = getattr(clients, attribute)
            service = descriptor_pool.Default().FindServiceByName(service_name)
            for method in service.methods:
                request = message_factory.GetMessageClass(method.input_type)()
                # As a route calls it, with no timeout of its own.
                call = getattr(stub, method.name)(iter([request]) if method.client_streaming else request)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    if method.server_streaming:
                        await call.read()
                    else:
                        await call
                assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED, caught.value
                called[f"/{service_name}/{method.name}"] = method.client_streaming or method.server_streaming
    finally:
        await clients.close()
        await server.stop(0)
    assert len(called) >= 60, sorted(called)
    assert set(recorder.deadlines) == set(called)
    for path, streaming in called.items():
        remaining = recorder.deadlines[path]
        assert remaining is not None, f"{path} reached the server without a deadline"
        limit = 5000.0 if streaming else 17.0
        # grpc-timeout travels rounded up to a coarser unit, hence the slack above the limit
        assert limit - 60 < remaining <= limit * 1.01 + 1, (path, remaining)


async def test_an_explicit_timeout_is_kept() -> None:
    recorder = _Recorder()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((recorder,))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = with_deadlines(ds_grpc.DatastoreServiceStub(channel), 17.0, 5000.0)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetImage(ds_pb.GetImageRequest(name="images/a"), timeout=3.0)
    finally:
        await server.stop(0)
    assert 0 < (recorder.deadlines["/labelgrid.datastore.v1.DatastoreService/GetImage"] or 0) <= 4.0


def test_only_gateway_clients_opens_channels() -> None:
    """Every gateway→service call goes through GrpcClients' stubs (so through with_deadlines):
    no other gateway module opens a channel to a service or builds a stub of its own
    (cli.py's readiness probe of a health port, with its own 1 s timeout, is the one exception)."""
    offenders = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        if path.name == "clients.py" and path.parent.name == "gateway":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                opens = (name.endswith("Stub") and name != "HealthStub") or re.fullmatch(
                    r"(insecure|secure)_channel", name
                )
                if opens and not (path.name == "cli.py" and name == "insecure_channel"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not offenders, offenders


# -- grpc issue 36066: early refusals keep their status ------------------------------------------


async def test_an_upload_refused_early_keeps_the_servers_status(hostile: Hostile) -> None:
    """The datastore refuses an upload over its limit while the client is still sending; the
    gateway's stubs report RESOURCE_EXHAUSTED every time (a plain grpc.aio stub, most times,
    reports INTERNAL "Internal error from Core" instead)."""
    limit = 32 * 1024 * 1024  # the stack's max_upload_bytes
    chunk = b"\0" * (1024 * 1024)

    async def messages(image_id: str) -> Any:
        yield ds_pb.UploadImageRequest(header=ds_pb.UploadImageHeader(image_id=image_id, file_name="a.nii.gz"))
        for _ in range(limit // len(chunk) + 16):
            yield ds_pb.UploadImageRequest(chunk=chunk)
        yield ds_pb.UploadImageRequest(finish=common_pb2.UploadFinish(sha256="0" * 64))

    codes = []
    async with grpc.aio.insecure_channel(hostile.stack.datastore_address) as channel:
        stub = with_deadlines(ds_grpc.DatastoreServiceStub(channel), 30.0, 60.0)
        for attempt in range(int(os.environ.get("LABELGRID_TEST_36066_TRIES", "8"))):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.UploadImage(messages(f"early-{attempt}"))
            codes.append((caught.value.code(), caught.value.details()))
    assert all(code is grpc.StatusCode.RESOURCE_EXHAUSTED for code, _ in codes), codes
    assert all("limit" in (details or "") for _, details in codes), codes
    await asyncio.to_thread(hostile.assert_alive)


def test_rest_upload_over_the_limit_is_a_413(hostile: Hostile) -> None:
    before = hostile.stored()
    body = os.urandom(40 * 1024 * 1024)
    # Several tries: the server's early end races the gateway's next write (and, before the
    # multipart fix, the closed request generator's GeneratorExit was re-raised as a 500).
    for attempt in range(8):
        answer = hostile.http.put(
            "/datastore/image", params={"image": f"too-big-{attempt}"}, files={"file": ("big.nii.gz", body)}
        )
        assert answer.status_code == 413, (attempt, answer.status_code, answer.text[:300])
        assert "limit" in answer.json()["detail"]
    assert hostile.stored() == before
    hostile.assert_alive()


def test_infer_upload_refused_at_its_header_is_a_422(hostile: Hostile) -> None:
    """InferUpload (a bidirectional stream through the same wrapper) with a 7 MiB image and a
    refused param: the inference service's INVALID_ARGUMENT, not a 500."""
    noise = np.random.default_rng(0).integers(0, 255, (192, 192, 192), dtype=np.uint8)
    body = gzip.compress(nib.Nifti1Image(noise, np.eye(4)).to_bytes(), compresslevel=1)
    for _ in range(3):
        answer = hostile.http.post(
            "/infer/segmentation",
            files={"file": ("big.nii.gz", body)},
            data={"params": json.dumps({"sw_batch_size": 1_000_000})},
        )
        assert answer.status_code == 422, answer.text[:300]
        assert "sw_batch_size" in answer.json()["detail"]
    hostile.assert_alive()
    assert hostile.http.get("/datastore/image/info", params={"image": BASE_IMAGE}).status_code == 200
