"""Bounded everything: RPCs per server, sessions per client and in total, image info size."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pydantic
import pytest

from services.common.server import GrpcService
from services.common.settings import ServiceSettings

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
