"""Bounded everything: RPCs per server, sessions per client and in total, image info size."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pydantic
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc

from services.common.server import GrpcService
from services.common.settings import ServiceSettings
from tests.integration.conftest import GatewayStack
from tests.security.conftest import nifti

pytestmark = pytest.mark.timeout(120)

SERVICE = "labelgrid.test.Hold"


async def test_a_server_runs_at_most_max_concurrent_rpcs() -> None:
    """Calls over the limit are refused RESOURCE_EXHAUSTED at once (the gateway's 429), not queued;
    once the held calls end, the server answers again."""
    release = asyncio.Event()
    entered = 0

    async def hold(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal entered
        entered += 1
        await release.wait()
        return request

    handler = grpc.method_handlers_generic_handler(SERVICE, {"Hold": grpc.unary_unary_rpc_method_handler(hold)})
    service = GrpcService(
        ServiceSettings(port=0, metrics_port=-1, max_concurrent_rpcs=3),
        [SERVICE],
        lambda server: server.add_generic_rpc_handlers((handler,)),
    )
    await service.start()
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            call = channel.unary_unary(f"/{SERVICE}/Hold")
            held = [asyncio.ensure_future(call(b"held", timeout=30)) for _ in range(3)]
            while entered < 3:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(b"over", timeout=30)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            assert await asyncio.gather(*held) == [b"held"] * 3
            assert await call(b"again", timeout=30) == b"again"
    finally:
        await service.stop(0)


@pytest.mark.parametrize("value", [0, -1])
def test_max_concurrent_rpcs_must_be_positive(value: Any) -> None:
    with pytest.raises(pydantic.ValidationError, match="max_concurrent_rpcs"):
        ServiceSettings(max_concurrent_rpcs=value)


# -- sessions ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quota_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    stack = GatewayStack(
        tmp_path_factory.mktemp("quota"), gateway_overrides={"sessions_per_client": 2, "sessions_max": 3}
    ).start()
    yield stack
    stack.stop()


def _stored_images(stack: GatewayStack) -> int:
    with grpc.insecure_channel(stack.datastore_address) as channel:
        page = ds_grpc.DatastoreServiceStub(channel).ListImages(ds_pb.ListImagesRequest(page_size=1000), timeout=10)
    return len(page.images)


def test_sessions_are_bounded_per_client_and_in_total(quota_stack: GatewayStack) -> None:
    with httpx.Client(base_url=quota_stack.url, timeout=30) as http:

        def create(client: str) -> httpx.Response:
            return http.put("/session/", files={"files": ("a.nii.gz", nifti())}, data={"client_id": client})

        first = [create("alice") for _ in range(2)]
        assert [answer.status_code for answer in first] == [200, 200], [a.text for a in first]
        before = _stored_images(quota_stack)
        refused = create("alice")
        assert refused.status_code == 429, refused.text
        assert "this client" in refused.json()["detail"] and "2" in refused.json()["detail"]
        assert _stored_images(quota_stack) == before  # nothing stored for the refused one
        assert create("bob").status_code == 200  # another client has its own places
        full = create("carol")
        assert full.status_code == 429 and "the limit is 3" in full.json()["detail"], full.text
        # Ending one of alice's sessions frees a place, for alice and in total.
        assert http.delete(f"/session/{first[0].json()['session_id']}").status_code == 200
        again = create("alice")
        assert again.status_code == 200, again.text
        assert http.get(f"/session/{again.json()['session_id']}").status_code == 200
