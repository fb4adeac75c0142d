"""grpc.aio server interceptors: metrics, auth and error mapping, for all four RPC shapes.

Each interceptor gets the method handler from `continuation` and returns a new handler
of the same shape whose behavior wraps the original (async function or async
generator), with the same serializers. Order on the server: metrics (outermost, so it
sees the final code of everything below), auth, errors (innermost, next to the handler).

Metrics follow go-grpc-prometheus's names and labels so existing dashboards work,
recorded in `finally` (BentoML and py-grpc-prometheus record too early or miss aio
aborts), on an injected registry.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc.aio import AbortError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.auth import ROLES, Authenticator, Identity, current_identity
from services.common.auth_methods import denial
from services.common.errors import ErrorKind, LabelgridError
from services.common.grpc_errors import PROMETHEUS_CODE_LABEL, rich_status, to_status
from services.common.resource_names import check_required

log = logging.getLogger("labelgrid.grpc")

INTERNAL_ERROR_MESSAGE = "internal error; see the server log"
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods that never need a token: probes (kubelet, load balancers). Reflection, which lists
every method (the admin ones too), needs a valid identity like any RPC (auth_methods)."""

Behavior = Callable[..., Any]
TokenCheck = Callable[[str], "bool | Awaitable[bool]"]


@dataclass(frozen=True)
class RpcInfo:
    """What the interceptors know about one method: its names and shape."""

    full_method: str
    service: str
    method: str
    request_streaming: bool
    response_streaming: bool

    @property
    def grpc_type(self) -> str:
        """go-grpc-prometheus's grpc_type label."""
        if self.request_streaming and self.response_streaming:
            return "bidi_stream"
        if self.request_streaming:
            return "client_stream"
        if self.response_streaming:
            return "server_stream"
        return "unary"

    @classmethod
    def of(cls, full_method: str, handler: grpc.RpcMethodHandler) -> RpcInfo:
        service, _, method = full_method.lstrip("/").rpartition("/")
        return cls(full_method, service or "unknown", method, handler.request_streaming, handler.response_streaming)


def _behavior_of(handler: grpc.RpcMethodHandler) -> Behavior:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def _with_behavior(handler: grpc.RpcMethodHandler, behavior: Behavior) -> grpc.RpcMethodHandler:
    """A handler of the same shape and serializers as `handler`, running `behavior`."""
    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(
        behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Base: wraps every async handler in `around_call` (one reply) or `around_stream` (async generator).

    Sync handlers (which grpc.aio runs only with a migration thread pool) pass through unwrapped.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        rpc = RpcInfo.of(handler_call_details.method, handler)
        return self.wrap(handler, rpc, handler_call_details)

    def wrap(
        self, handler: grpc.RpcMethodHandler, rpc: RpcInfo, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        behavior = _behavior_of(handler)
        if inspect.isasyncgenfunction(behavior):

            async def wrapped_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with aclosing(self.around_stream(behavior, request, context, rpc)) as responses:
                    async for response in responses:
                        yield response

            return _with_behavior(handler, wrapped_stream)
        if inspect.iscoroutinefunction(behavior):

            async def wrapped_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self.around_call(behavior, request, context, rpc)

            return _with_behavior(handler, wrapped_call)
        return handler

    async def around_call(
        self, behavior: Behavior, request: Any, context: grpc.aio.ServicerContext, rpc: RpcInfo
    ) -> Any:
        return await behavior(request, context)

    async def around_stream(
        self, behavior: Behavior, request: Any, context: grpc.aio.ServicerContext, rpc: RpcInfo
    ) -> AsyncGenerator[Any, None]:
        async with aclosing(behavior(request, context)) as responses:
            async for response in responses:
                yield response


# -- metrics -------------------------------------------------------------------------


class ServerMetrics:
    """go-grpc-prometheus's server metrics, on the registry given (never the global one)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        names = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started_total", "Total number of RPCs started on the server.", names, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            [*names, "grpc_code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            names,
            registry=registry,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            names,
            registry=registry,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            names,
            registry=registry,
        )
        self.in_flight = Gauge(
            "grpc_server_in_flight",
            "Number of RPCs being handled by the server right now.",
            ["grpc_service", "grpc_method"],
            registry=registry,
        )

    def initialize(self, rpc: RpcInfo) -> None:
        """Pre-creates a method's series at zero, so rates and alerts work before its first call."""
        labels = (rpc.grpc_type, rpc.service, rpc.method)
        self.started.labels(*labels)
        self.handling_seconds.labels(*labels)
        self.msg_received.labels(*labels)
        self.msg_sent.labels(*labels)
        self.in_flight.labels(rpc.service, rpc.method)
        for code in grpc.StatusCode:
            self.handled.labels(*labels, PROMETHEUS_CODE_LABEL[code])


def _status_code(value: Any) -> grpc.StatusCode | None:
    """context.code() as a StatusCode (aio may hand back the StatusCode or its int value)."""
    if value is None or isinstance(value, grpc.StatusCode):
        return value
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def _code_after_cancel(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """A cancelled handler: its deadline ran out, or the client hung up."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class _CountingContext:
    """The servicer context, counting the messages a handler reads or writes through it."""

    def __init__(self, context: grpc.aio.ServicerContext, received: Counter, sent: Counter):
        self._context = context
        self._received = received
        self._sent = sent

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._received.inc()
        return message

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._sent.inc()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class MetricsInterceptor(WrappingInterceptor):
    """Counts, times and gauges every RPC; the code is recorded once the handler is done."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def _begin(self, rpc: RpcInfo) -> tuple[str, str, str]:
        labels = (rpc.grpc_type, rpc.service, rpc.method)
        self.metrics.started.labels(*labels).inc()
        self.metrics.in_flight.labels(rpc.service, rpc.method).inc()
        return labels

    def _end(self, rpc: RpcInfo, labels: tuple[str, str, str], code: grpc.StatusCode, started: float) -> None:
        self.metrics.handled.labels(*labels, PROMETHEUS_CODE_LABEL[code]).inc()
        self.metrics.handling_seconds.labels(*labels).observe(time.perf_counter() - started)
        self.metrics.in_flight.labels(rpc.service, rpc.method).dec()

    def _count_requests(self, request: Any, rpc: RpcInfo, labels: tuple[str, str, str]) -> Any:
        received = self.metrics.msg_received.labels(*labels)
        if not rpc.request_streaming:
            received.inc()
            return request

        async def counted() -> AsyncIterator[Any]:
            async for message in request:
                received.inc()
                yield message

        return counted()

    async def around_call(
        self, behavior: Behavior, request: Any, context: grpc.aio.ServicerContext, rpc: RpcInfo
    ) -> Any:
        labels = self._begin(rpc)
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            if rpc.request_streaming or rpc.response_streaming:
                # A coroutine streaming handler reads and writes through the context (grpc's health Watch does).
                inner_context: Any = _CountingContext(
                    context, self.metrics.msg_received.labels(*labels), self.metrics.msg_sent.labels(*labels)
                )
            else:
                inner_context = context
            response = await behavior(self._count_requests(request, rpc, labels), inner_context)
            code = _status_code(context.code()) or grpc.StatusCode.OK
            if code is grpc.StatusCode.OK and not rpc.response_streaming:
                self.metrics.msg_sent.labels(*labels).inc()
            return response
        except asyncio.CancelledError:
            code = _code_after_cancel(context)
            raise
        except BaseException:
            # AbortError carries its code on the context; anything else becomes UNKNOWN in grpc.
            code = _status_code(context.code()) or grpc.StatusCode.UNKNOWN
            raise
        finally:
            self._end(rpc, labels, code, started)

    async def around_stream(
        self, behavior: Behavior, request: Any, context: grpc.aio.ServicerContext, rpc: RpcInfo
    ) -> AsyncGenerator[Any, None]:
        labels = self._begin(rpc)
        started = time.perf_counter()
        sent = self.metrics.msg_sent.labels(*labels)
        code = grpc.StatusCode.UNKNOWN
        try:
            async with aclosing(behavior(self._count_requests(request, rpc, labels), context)) as responses:
                async for response in responses:
                    yield response
                    sent.inc()
            code = _status_code(context.code()) or grpc.StatusCode.OK
        except (asyncio.CancelledError, GeneratorExit):
            # GeneratorExit: grpc closed the stream generator because the call ended early.
            code = _code_after_cancel(context)
            raise
        except BaseException:
            code = _status_code(context.code()) or grpc.StatusCode.UNKNOWN
            raise
        finally:
            self._end(rpc, labels, code, started)


# -- auth ----------------------------------------------------------------------------


def static_token_check(tokens: Iterable[str]) -> TokenCheck:
    """Accepts exactly the configured tokens, compared in constant time."""
    accepted = [token.encode() for token in tokens if token]

    def check(token: str) -> bool:
        candidate = token.encode()
        # No short-circuit: every token is compared, so timing says nothing about which matched.
        return sum(hmac.compare_digest(candidate, good) for good in accepted) > 0

    return check


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` header, if there is one."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class AuthInterceptor(WrappingInterceptor):
    """Requires a valid bearer token on every RPC but health checks, and the
    caller's right to the method (services.common.auth_methods: MONAI Label's role for a user,
    the named services for a service token).

    `check` is either an `Authenticator` (token -> Identity or None) or a plain token check
    (token -> bool, possibly awaitable), whose accepted tokens act as admins. The identity of an
    accepted call is in `services.common.auth.current_identity` while its handler runs.
    """

    def __init__(
        self,
        check: TokenCheck | Authenticator,
        public_prefixes: Sequence[str] = PUBLIC_METHOD_PREFIXES,
        enforce_roles: bool = True,
    ):
        self.check = check
        self.public_prefixes = tuple(public_prefixes)
        self.enforce_roles = enforce_roles

    async def _identify(self, token: str) -> Identity | None:
        if isinstance(self.check, Authenticator):
            return await self.check.aauthenticate(token)  # an issuer's keys: fetched off the loop
        verdict = self.check(token)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return Identity("token-user", frozenset(ROLES)) if verdict else None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self.public_prefixes):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            return _rejecting(
                handler, rich_status(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token", "UNAUTHENTICATED")
            )
        try:
            identity = await self._identify(token)
        except LabelgridError as error:
            # A check may say why (e.g. Unavailable while its key set cannot be fetched).
            return _rejecting(handler, to_status(error))
        except Exception:
            # Raised here, it would reach the client as UNKNOWN with its text, uncounted.
            log.exception("token check failed", extra={"method": method})
            return _rejecting(handler, rich_status(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE, "SERVER_ERROR"))
        if identity is None:
            return _rejecting(
                handler, rich_status(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token", "UNAUTHENTICATED")
            )
        why = denial(identity, method) if self.enforce_roles else None
        if why is not None:
            log.warning("rpc denied", extra={"method": method, "user": identity.username, "why": why})
            return _rejecting(handler, rich_status(grpc.StatusCode.PERMISSION_DENIED, why, "PERMISSION_DENIED"))
        return _as_identity(handler, identity)


def _as_identity(handler: grpc.RpcMethodHandler, identity: Identity) -> grpc.RpcMethodHandler:
    """`handler`, run with `current_identity` set to `identity` (its own task: no leak to others)."""
    behavior = _behavior_of(handler)
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            current_identity.set(identity)
            async with aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response

        return _with_behavior(handler, stream)
    if inspect.iscoroutinefunction(behavior):

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            current_identity.set(identity)
            return await behavior(request, context)

        return _with_behavior(handler, call)
    return handler


def _rejecting(handler: grpc.RpcMethodHandler, status: grpc.Status) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s shape that aborts with `status` without running it."""

    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort_with_status(status)

    # A coroutine is a valid behavior for all four shapes in grpc.aio.
    return _with_behavior(handler, reject)


# -- errors --------------------------------------------------------------------------


_SERVER_SIDE_KINDS = frozenset({ErrorKind.INTERNAL, ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE_EXCEEDED})


class ErrorInterceptor(WrappingInterceptor):
    """Domain errors -> their status with ErrorInfo; anything unexpected -> INTERNAL, logged.

    A request message (not a request stream) missing a field its contract marks
    `(google.api.field_behavior) = REQUIRED` is refused here, INVALID_ARGUMENT (INVALID_INPUT),
    before the handler runs. Aborts by the handler and cancellation pass through untouched.
    """

    def __init__(self, domain: str = "labelgrid"):
        self.domain = domain

    async def _abort(self, error: Exception, context: grpc.aio.ServicerContext, rpc: RpcInfo) -> None:
        if isinstance(error, LabelgridError):
            # The client's fault (bad input, not found...) is routine; a server-side failure is not.
            level = logging.WARNING if error.kind in _SERVER_SIDE_KINDS else logging.DEBUG
            log.log(
                level,
                "rpc failed",
                extra={
                    "method": rpc.full_method,
                    "kind": error.kind.value,
                    "reason": error.reason,
                    "error": error.message,
                },
            )
            await context.abort_with_status(to_status(error, self.domain))
            return
        log.error("unexpected error in rpc", exc_info=error, extra={"method": rpc.full_method})
        await context.abort_with_status(
            rich_status(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE, "SERVER_ERROR", domain=self.domain)
        )

    async def around_call(
        self, behavior: Behavior, request: Any, context: grpc.aio.ServicerContext, rpc: RpcInfo
    ) -> Any:
        try:
            if isinstance(request, Message):
                check_required(request)
            return await behavior(request, context)
        except AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - CancelledError is a BaseException and passes
            await self._abort(error, context, rpc)

    async def around_stream(
        self, behavior: Behavior, request: Any, context: grpc.aio.ServicerContext, rpc: RpcInfo
    ) -> AsyncGenerator[Any, None]:
        try:
            if isinstance(request, Message):
                check_required(request)
            async with aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        except AbortError:
            raise
        except Exception as error:  # noqa: BLE001
            await self._abort(error, context, rpc)


def server_interceptors(
    metrics: ServerMetrics,
    auth_tokens: Sequence[str] = (),
    token_check: TokenCheck | None = None,
    authenticator: Authenticator | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptor chain in its order: metrics, auth (if an authenticator, tokens or a check
    are given), errors. A plain `token_check` (tests, custom checks) authenticates without roles."""
    chain: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(metrics)]
    if token_check is not None:
        chain.append(AuthInterceptor(token_check, enforce_roles=False))
    elif authenticator is not None:
        chain.append(AuthInterceptor(authenticator))
    elif auth_tokens:
        chain.append(AuthInterceptor(Authenticator(static_tokens=auth_tokens)))
    chain.append(ErrorInterceptor())
    return chain
