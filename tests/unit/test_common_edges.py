"""Edges of services.common: failing token checks, long error messages, context-style
streams, a taken port, settings bounds, and the async spool adapter.

Real grpc.aio servers on ephemeral loopback ports, reached over real channels.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pydantic
import pytest
from grpc_health.v1 import health, health_pb2

from services.common.chunks import CHUNK_SIZE, SpoolWriter, iter_file_chunks
from services.common.errors import InvalidArgument, OutOfRange, Unavailable
from services.common.grpc_errors import MAX_MESSAGE_CHARS, error_info_from_rpc_error
from services.common.interceptors import TokenCheck
from services.common.server import GrpcService
from services.common.settings import ServiceSettings
from tests.fixtures.polling import eventually

pytestmark = pytest.mark.timeout(60)

SERVICE = "test.Edges"


def edge_handlers() -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"long":
            raise InvalidArgument("x" * 20_000, metadata={"detail": "y" * 20_000})
        return request

    async def write_three(request: bytes, context: grpc.aio.ServicerContext) -> None:
        for _ in range(3):
            await context.write(request)

    async def read_all(requests: Any, context: grpc.aio.ServicerContext) -> bytes:
        parts = []
        while (part := await context.read()) is not grpc.aio.EOF:
            parts.append(part)
        return b"".join(parts)

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "WriteThree": grpc.unary_stream_rpc_method_handler(write_three),
            "ReadAll": grpc.stream_unary_rpc_method_handler(read_all),
        },
    )


async def start_service(token_check: TokenCheck | None = None, **settings: Any) -> GrpcService:
    service = GrpcService(
        ServiceSettings(**{"port": 0, "metrics_port": -1, **settings}),
        [SERVICE],
        lambda server: server.add_generic_rpc_handlers((edge_handlers(),)),
        token_check=token_check,
    )
    await service.start()
    return service


def handled(service: GrpcService, method: str, code: str, grpc_type: str = "unary") -> float:
    labels = {"grpc_type": grpc_type, "grpc_service": SERVICE, "grpc_method": method, "grpc_code": code}
    return service.registry.get_sample_value("grpc_server_handled_total", labels) or 0.0


async def call_unary(service: GrpcService, request: bytes, token: str | None = None) -> bytes:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(service.address) as channel:
        return await channel.unary_unary(f"/{SERVICE}/Unary")(request, metadata=metadata, timeout=5)


# -- auth checks that fail -----------------------------------------------------------------


async def test_a_token_check_that_raises_is_internal_generic_and_counted(caplog: pytest.LogCaptureFixture):
    def broken(token: str) -> bool:
        raise RuntimeError("key set unreachable: s3cr3t")

    service = await start_service(token_check=broken)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call_unary(service, b"x", token="t")
        code, reason, message, _ = error_info_from_rpc_error(caught.value)
        assert (code, reason) == (grpc.StatusCode.INTERNAL, "SERVER_ERROR")
        assert "s3cr3t" not in message and "RuntimeError" not in message
        assert handled(service, "Unary", "Internal") == 1
        assert any("s3cr3t" in str(record.exc_info[1]) for record in caplog.records if record.exc_info)
    finally:
        await service.stop(0)


async def test_an_async_token_check_may_answer_with_a_domain_error():
    async def check(token: str) -> bool:
        if token == "down":
            raise Unavailable("identity provider unavailable", reason="AUTH_UNAVAILABLE")
        return token == "good"

    service = await start_service(token_check=check)
    try:
        assert await call_unary(service, b"hi", token="good") == b"hi"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call_unary(service, b"hi", token="down")
        assert error_info_from_rpc_error(caught.value)[:2] == (grpc.StatusCode.UNAVAILABLE, "AUTH_UNAVAILABLE")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call_unary(service, b"hi", token="bad")
        assert error_info_from_rpc_error(caught.value)[:2] == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
        assert handled(service, "Unary", "Unavailable") == 1
        assert handled(service, "Unary", "Unauthenticated") == 1
    finally:
        await service.stop(0)


# -- errors and metrics --------------------------------------------------------------------


async def test_a_long_error_message_is_clipped_not_lost():
    """Unclipped, 20 kB in the trailers make the client fail with RESOURCE_EXHAUSTED instead."""
    service = await start_service()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call_unary(service, b"long")
        code, reason, message, metadata = error_info_from_rpc_error(caught.value)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
        assert message.startswith("xxx") and len(message) <= MAX_MESSAGE_CHARS
        assert len(metadata["detail"]) <= MAX_MESSAGE_CHARS
    finally:
        await service.stop(0)


async def test_messages_read_and_written_through_the_context_are_counted():
    service = await start_service()

    def sample(name: str, method: str, grpc_type: str) -> float | None:
        labels = {"grpc_type": grpc_type, "grpc_service": SERVICE, "grpc_method": method}
        return service.registry.get_sample_value(name, labels)

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"a", b"b"):
            yield part

    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            replies = [reply async for reply in channel.unary_stream(f"/{SERVICE}/WriteThree")(b"m", timeout=5)]
            assert replies == [b"m"] * 3
            assert await channel.stream_unary(f"/{SERVICE}/ReadAll")(parts(), timeout=5) == b"ab"
        assert sample("grpc_server_msg_sent_total", "WriteThree", "server_stream") == 3
        assert sample("grpc_server_msg_received_total", "ReadAll", "client_stream") == 2
        assert handled(service, "ReadAll", "OK", "client_stream") == 1
    finally:
        await service.stop(0)


# -- lifecycle -----------------------------------------------------------------------------


async def test_a_taken_port_fails_the_start():
    """grpc turns SO_REUSEPORT on by default: a second server would silently share the port."""
    first = await start_service()
    try:
        second = GrpcService(ServiceSettings(port=first.port, metrics_port=-1), [SERVICE], lambda server: None)
        with pytest.raises(RuntimeError):
            await second.start()
    finally:
        await first.stop(0)


async def test_the_whole_server_is_not_serving_until_started(monkeypatch: pytest.MonkeyPatch):
    original_set = health.aio.HealthServicer.set
    whole_server: list[int] = []

    async def recording_set(self: Any, name: str, status: int) -> None:
        if name == "":
            whole_server.append(status)
        await original_set(self, name, status)

    monkeypatch.setattr(health.aio.HealthServicer, "set", recording_set)
    service = await start_service()
    try:
        assert whole_server == [health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING]
    finally:
        await service.stop(0)


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {"port": -1},
        {"port": 65536},
        {"metrics_port": -2},
        {"grace_seconds": -0.5},
        {"max_message_bytes": CHUNK_SIZE},
        {"log_level": "verbose"},
    ],
)
def test_settings_out_of_bounds_are_refused(values: dict[str, Any]):
    with pytest.raises(pydantic.ValidationError):
        ServiceSettings(**values)


def test_log_level_is_case_insensitive():
    assert ServiceSettings(log_level="warning").log_level == "WARNING"


# -- chunks --------------------------------------------------------------------------------


def leftovers(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def test_finish_without_a_checksum_reports_the_digest(tmp_path: Path):
    writer = SpoolWriter(tmp_path, max_bytes=100)
    writer.write(b"abc")
    spooled = writer.finish(None)
    assert spooled.sha256 == hashlib.sha256(b"abc").hexdigest()
    assert spooled.path.read_bytes() == b"abc"


def test_a_malformed_checksum_is_invalid_input_not_a_mismatch(tmp_path: Path):
    writer = SpoolWriter(tmp_path, max_bytes=100)
    writer.write(b"abc")
    with pytest.raises(InvalidArgument) as caught:
        writer.finish("md5:1234")
    assert caught.value.reason == "INVALID_INPUT"
    assert leftovers(tmp_path) == []


def test_an_offset_past_the_end_is_out_of_range_before_any_chunk(tmp_path: Path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 10)
    with pytest.raises(OutOfRange):
        iter_file_chunks(path, offset=11)  # raised by the call itself, not by the first next()
    assert list(iter_file_chunks(path, offset=10)) == []


async def _chunks(*parts: bytes, then: Callable[[], Any] | None = None) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if then is not None:
        await then()


def test_bounds_hold_for_a_subclass_that_redeclares_the_field():
    class WithDefaultPort(ServiceSettings):
        port: int = 50051

    with pytest.raises(pydantic.ValidationError):
        WithDefaultPort(port=-1)  # grpc would bind port 65535 for "host:-1"


async def test_a_caller_cancelled_while_finishing_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import threading

    from services.common.chunks import finish_spool

    writer = SpoolWriter(tmp_path, max_bytes=100)
    writer.write(b"abc")
    release, entered = threading.Event(), threading.Event()
    real_finish = writer.finish

    def slow_finish(expected: str | None = None):
        spooled = real_finish(expected)
        entered.set()
        release.wait(5)  # finished, but the worker thread has not handed the file over yet
        return spooled

    monkeypatch.setattr(writer, "finish", slow_finish)
    task = asyncio.ensure_future(finish_spool(writer))
    assert await asyncio.to_thread(entered.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await eventually(lambda: leftovers(tmp_path) == [], "the spool to be removed", timeout=5, interval=0.01)
