"""GrpcService and its interceptors on a real grpc.aio server over a real loopback channel.

The test service `test.Echo` is registered with bytes-in/bytes-out generic handlers (no
generated protos), one method per RPC shape plus a hanging one for cancel and deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import InvalidArgument, NotFound, OutOfRange, ResourceExhausted
from services.common.grpc_errors import HTTP_STATUS_FOR_CODE, error_details
from services.common.server import GrpcService
from services.common.settings import ServiceSettings
from tests.fixtures.polling import eventually

pytestmark = pytest.mark.timeout(60)

SERVICE = "test.Echo"
SECRET_DETAIL = "s3cr3t-internal-detail"


@dataclass
class EchoState:
    hang_started: asyncio.Event = field(default_factory=asyncio.Event)
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)
    hang_outcome: asyncio.Future[str] | None = None


def echo_handlers(state: EchoState) -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"notfound":
            raise NotFound("no image 'x'", reason="IMAGE_NOT_FOUND", metadata={"image": "x"})
        if request == b"boom":
            raise RuntimeError(SECRET_DETAIL)
        if request == b"abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")
        if request.startswith(b"slow:"):
            state.slow_started.set()
            await asyncio.sleep(float(request[5:]))
        return request

    async def hang(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        state.hang_outcome = asyncio.get_running_loop().create_future()
        state.hang_started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            state.hang_outcome.set_result("cancelled")
            raise
        state.hang_outcome.set_result("finished")
        return b""

    async def server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        count, _, fail = request.partition(b":")
        for number in range(int(count)):
            yield str(number).encode()
        if fail == b"fail":
            raise OutOfRange("ran past the end", reason="END_OF_STREAM")
        if fail == b"boom":
            raise RuntimeError(SECRET_DETAIL)

    async def client_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        parts = []
        async for part in requests:
            if part == b"bad":
                raise InvalidArgument("bad part", reason="INVALID_INPUT")
            parts.append(part)
        return b"".join(parts)

    async def bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for part in requests:
            if part == b"full":
                raise ResourceExhausted("queue full", reason="QUEUE_FULL")
            yield part.upper()

    identity: dict[str, Any] = {}
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, **identity),
            "Hang": grpc.unary_unary_rpc_method_handler(hang),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )


@dataclass
class Running:
    service: GrpcService
    channel: grpc.aio.Channel
    state: EchoState

    def method(self, name: str, kind: str = "unary_unary", token: str | None = None):
        return getattr(self.channel, kind)(f"/{SERVICE}/{name}")

    def sample(self, name: str, **labels: str) -> float | None:
        return self.service.registry.get_sample_value(name, labels)

    def handled(self, method: str, code: str, grpc_type: str = "unary") -> float:
        value = self.sample(
            "grpc_server_handled_total", grpc_type=grpc_type, grpc_service=SERVICE, grpc_method=method, grpc_code=code
        )
        return value or 0.0

    async def eventually_handled(self, method: str, code: str, grpc_type: str = "unary", count: float = 1.0) -> None:
        await eventually(
            lambda: self.handled(method, code, grpc_type) >= count, f"{code} recorded for {method}", timeout=5
        )


async def start(**overrides: Any) -> Running:
    state = EchoState()
    values: dict[str, Any] = {"port": 0, "metrics_port": 0, "grace_seconds": 1.0}
    token_check = overrides.pop("token_check", None)
    on_stop = overrides.pop("on_stop", None)
    values.update(overrides)
    service = GrpcService(
        ServiceSettings(**values),
        [SERVICE],
        lambda server: server.add_generic_rpc_handlers((echo_handlers(state),)),
        on_stop=on_stop,
        token_check=token_check,
    )
    await service.start()
    channel = grpc.aio.insecure_channel(service.address)
    return Running(service, channel, state)


@pytest.fixture
async def running():
    started = await start()
    yield started
    await started.channel.close()
    await started.service.stop(0)


def code_of(error: grpc.aio.AioRpcError) -> grpc.StatusCode:
    return error.code()


# -- metrics and errors, all four shapes ---------------------------------------------------


async def test_unary_ok_is_counted(running: Running):
    assert await running.method("Unary")(b"hi", timeout=5) == b"hi"
    labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "Unary"}
    await running.eventually_handled("Unary", "OK")
    assert running.sample("grpc_server_started_total", **labels) == 1
    assert running.sample("grpc_server_msg_received_total", **labels) == 1
    assert running.sample("grpc_server_msg_sent_total", **labels) == 1
    assert running.sample("grpc_server_handling_seconds_count", **labels) == 1
    assert running.sample("grpc_server_in_flight", grpc_service=SERVICE, grpc_method="Unary") == 0


async def test_domain_error_has_precise_code_and_reason(running: Running):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.method("Unary")(b"notfound", timeout=5)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    details = error_details(caught.value)
    assert (details.code, details.reason, details.message) == (
        grpc.StatusCode.NOT_FOUND,
        "IMAGE_NOT_FOUND",
        "no image 'x'",
    )
    assert details.metadata == {"image": "x"}
    assert details.domain == "labelgrid"
    assert details.http_status == 404
    await running.eventually_handled("Unary", "NotFound")
    assert running.handled("Unary", "OK") == 0


async def test_unexpected_exception_is_internal_without_details(running: Running, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR, logger="labelgrid.grpc"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await running.method("Unary")(b"boom", timeout=5)
    error = caught.value
    assert error.code() is grpc.StatusCode.INTERNAL
    assert error.details() == "internal error; see the server log"
    assert SECRET_DETAIL not in str(error) and "Traceback" not in str(error)
    assert SECRET_DETAIL not in repr(error.trailing_metadata())
    assert error_details(error).reason == "SERVER_ERROR"
    # ... but the server log has the traceback.
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and SECRET_DETAIL in str(logged[0].exc_info[1])
    await running.eventually_handled("Unary", "Internal")


async def test_abort_in_handler_keeps_its_code(running: Running):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.method("Unary")(b"abort", timeout=5)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "not yours"
    await running.eventually_handled("Unary", "PermissionDenied")


async def test_server_stream_ok_and_mid_stream_error(running: Running):
    call = running.method("ServerStream", "unary_stream")
    assert [m async for m in call(b"3", timeout=5)] == [b"0", b"1", b"2"]
    await running.eventually_handled("ServerStream", "OK", "server_stream")
    labels = {"grpc_type": "server_stream", "grpc_service": SERVICE, "grpc_method": "ServerStream"}
    assert running.sample("grpc_server_msg_sent_total", **labels) == 3
    assert running.sample("grpc_server_msg_received_total", **labels) == 1

    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in call(b"2:fail", timeout=5):
            received.append(message)
    assert received == [b"0", b"1"]
    assert caught.value.code() is grpc.StatusCode.OUT_OF_RANGE
    assert error_details(caught.value).reason == "END_OF_STREAM"
    await running.eventually_handled("ServerStream", "OutOfRange", "server_stream")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call(b"1:boom", timeout=5):
            pass
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert SECRET_DETAIL not in caught.value.details()
    await running.eventually_handled("ServerStream", "Internal", "server_stream")


async def test_client_stream_ok_and_error(running: Running):
    call = running.method("ClientStream", "stream_unary")

    async def parts(*items: bytes) -> AsyncIterator[bytes]:
        for item in items:
            yield item

    assert await call(parts(b"a", b"b", b"c"), timeout=5) == b"abc"
    await running.eventually_handled("ClientStream", "OK", "client_stream")
    labels = {"grpc_type": "client_stream", "grpc_service": SERVICE, "grpc_method": "ClientStream"}
    assert running.sample("grpc_server_msg_received_total", **labels) == 3
    assert running.sample("grpc_server_msg_sent_total", **labels) == 1

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(parts(b"a", b"bad"), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value).reason == "INVALID_INPUT"
    await running.eventually_handled("ClientStream", "InvalidArgument", "client_stream")


async def test_bidi_ok_and_mid_stream_error(running: Running):
    call = running.method("Bidi", "stream_stream")

    async def parts(*items: bytes) -> AsyncIterator[bytes]:
        for item in items:
            yield item

    assert [m async for m in call(parts(b"a", b"b"), timeout=5)] == [b"A", b"B"]
    await running.eventually_handled("Bidi", "OK", "bidi_stream")
    labels = {"grpc_type": "bidi_stream", "grpc_service": SERVICE, "grpc_method": "Bidi"}
    assert running.sample("grpc_server_msg_received_total", **labels) == 2
    assert running.sample("grpc_server_msg_sent_total", **labels) == 2

    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in call(parts(b"a", b"full", b"c"), timeout=5):
            received.append(message)
    assert received == [b"A"]
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(caught.value).reason == "QUEUE_FULL"
    await running.eventually_handled("Bidi", "ResourceExhausted", "bidi_stream")


async def test_client_cancel_is_recorded_and_cancels_the_handler(running: Running):
    call = running.method("Hang")(b"", timeout=10)
    await asyncio.wait_for(running.state.hang_started.wait(), 5)
    assert running.sample("grpc_server_in_flight", grpc_service=SERVICE, grpc_method="Hang") == 1
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await asyncio.wait_for(running.state.hang_outcome, 5) == "cancelled"
    await running.eventually_handled("Hang", "Canceled")
    assert running.sample("grpc_server_in_flight", grpc_service=SERVICE, grpc_method="Hang") == 0


async def test_deadline_exceeded_is_recorded(running: Running):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.method("Hang")(b"", timeout=0.3)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert await asyncio.wait_for(running.state.hang_outcome, 5) == "cancelled"
    await running.eventually_handled("Hang", "DeadlineExceeded")


async def test_health_series_are_pre_created(running: Running):
    value = running.service.registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": "server_stream",
            "grpc_service": "grpc.health.v1.Health",
            "grpc_method": "Watch",
            "grpc_code": "Unavailable",
        },
    )
    assert value == 0


# -- metrics endpoint ----------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def test_metrics_endpoint_serves_the_registry():
    running = await start()
    try:
        await running.method("Unary")(b"x", timeout=5)
        await running.eventually_handled("Unary", "OK")
        assert running.service.metrics_port not in (None, 0)
        text = await asyncio.to_thread(scrape, running.service.metrics_port)
        assert (
            'grpc_server_handled_total{grpc_code="OK",grpc_method="Unary",grpc_service="test.Echo",grpc_type="unary"} 1.0'
            in text
        )
        assert "grpc_server_handling_seconds_bucket" in text
        # The service's own registry, not the process-global one.
        assert "python_gc_objects_collected_total" not in text
    finally:
        await running.channel.close()
        await running.service.stop(0)
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(scrape, running.service.metrics_port)


async def test_metrics_can_be_turned_off():
    running = await start(metrics_port=-1)
    try:
        assert running.service.metrics_port is None
        assert await running.method("Unary")(b"x", timeout=5) == b"x"
    finally:
        await running.channel.close()
        await running.service.stop(0)


# -- auth ----------------------------------------------------------------------------------


async def health_status(channel: grpc.aio.Channel, name: str = "", metadata: Any = None) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5, metadata=metadata)
    return response.status


async def test_auth_off_by_default(running: Running):
    assert await running.method("Unary")(b"x", timeout=5) == b"x"


async def test_auth_requires_a_bearer_token_except_for_health():
    running = await start(auth_tokens=["good-token", "other"])
    try:
        unary = running.method("Unary")
        for metadata in [None, (("authorization", "Bearer bad"),), (("authorization", "good-token"),)]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary(b"x", timeout=5, metadata=metadata)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            details = error_details(caught.value)
            assert details.reason == "UNAUTHENTICATED" and details.http_status == 401
        assert await unary(b"x", timeout=5, metadata=(("authorization", "Bearer good-token"),)) == b"x"
        assert await unary(b"y", timeout=5, metadata=(("authorization", "bearer other"),)) == b"y"
        # Streams are guarded too.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in running.method("ServerStream", "unary_stream")(b"2", timeout=5):
                pass
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        # Probes need no token.
        assert await health_status(running.channel) == health_pb2.HealthCheckResponse.SERVING
        await running.eventually_handled("Unary", "Unauthenticated", count=3)
        await running.eventually_handled("Unary", "OK", count=2)
    finally:
        await running.channel.close()
        await running.service.stop(0)


async def test_auth_check_is_pluggable():
    seen: list[str] = []

    async def check(token: str) -> bool:
        seen.append(token)
        return token.startswith("ok-")

    running = await start(token_check=check)
    try:
        assert await running.method("Unary")(b"x", timeout=5, metadata=(("authorization", "Bearer ok-1"),)) == b"x"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await running.method("Unary")(b"x", timeout=5, metadata=(("authorization", "Bearer no-1"),))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert seen == ["ok-1", "no-1"]
    finally:
        await running.channel.close()
        await running.service.stop(0)


# -- health, lifecycle ---------------------------------------------------------------------


async def test_serving_only_after_bind_and_start(monkeypatch: pytest.MonkeyPatch):
    from grpc_health.v1 import health

    original_set = health.aio.HealthServicer.set
    order: list[tuple[str, int, int | None]] = []
    services: list[GrpcService] = []

    async def recording_set(self, name, status):
        order.append((name, status, services[0].port if services else None))
        await original_set(self, name, status)

    monkeypatch.setattr(health.aio.HealthServicer, "set", recording_set)
    service = GrpcService(ServiceSettings(port=0, metrics_port=-1), [SERVICE], lambda server: None)
    services.append(service)
    await service.start()
    try:
        serving = [entry for entry in order if entry[1] == health_pb2.HealthCheckResponse.SERVING]
        assert {name for name, _, _ in serving} == {SERVICE, ""}
        assert all(port == service.port and port for _, _, port in serving)
    finally:
        await service.stop(0)


async def test_health_serving_then_not_serving_on_stop(running: Running):
    assert await health_status(running.channel) == health_pb2.HealthCheckResponse.SERVING
    assert await health_status(running.channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    await running.service.set_serving(SERVICE, False)
    assert await health_status(running.channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    await running.service.set_serving(SERVICE, True)

    stub = health_pb2_grpc.HealthStub(running.channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(running.service.stop(0.5))
    assert (await asyncio.wait_for(watch.read(), 5)).status == health_pb2.HealthCheckResponse.NOT_SERVING
    await stopping


async def test_stop_drains_in_flight_calls():
    stopped: list[bool] = []

    async def on_stop() -> None:
        stopped.append(True)

    running = await start(on_stop=on_stop)
    try:
        slow = asyncio.ensure_future(running.method("Unary")(b"slow:0.5", timeout=10))
        await asyncio.wait_for(running.state.slow_started.wait(), 5)  # the call is in flight
        # Returns once drained, not after the whole grace: a grace far past the bound of the wait.
        await asyncio.wait_for(running.service.stop(600), 30)
        assert await slow == b"slow:0.5"
        assert stopped == [True]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await running.method("Unary")(b"after", timeout=2)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        await running.service.stop()  # idempotent
        assert stopped == [True]
    finally:
        await running.channel.close()


async def test_calls_past_the_grace_are_cancelled():
    running = await start()
    try:
        hung = asyncio.ensure_future(running.method("Hang")(b"", timeout=20))
        await asyncio.wait_for(running.state.hang_started.wait(), 5)
        await asyncio.wait_for(running.service.stop(0.3), 30)  # ends at the grace, not with the hung call
        with pytest.raises(grpc.aio.AioRpcError):
            await hung
        assert await asyncio.wait_for(running.state.hang_outcome, 5) == "cancelled"
    finally:
        await running.channel.close()


async def test_run_until_signal_stops_gracefully_on_sigterm():
    original = signal.getsignal(signal.SIGTERM)
    running = await start()
    try:
        task = asyncio.ensure_future(running.service.run_until_signal())

        def handles_sigterm() -> bool:
            assert not task.done()
            return signal.getsignal(signal.SIGTERM) != original

        await eventually(handles_sigterm, "the loop to handle SIGTERM", timeout=5, interval=0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 10)
        with pytest.raises(grpc.aio.AioRpcError):
            await running.method("Unary")(b"x", timeout=2)
        assert signal.getsignal(signal.SIGTERM) == original
    finally:
        await running.channel.close()
        await running.service.stop(0)


def test_http_table_covers_every_code():
    assert set(HTTP_STATUS_FOR_CODE) == set(grpc.StatusCode)
