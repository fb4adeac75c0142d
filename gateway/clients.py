"""The gateway's gRPC channels and the chunk-stream helpers every route shares.

Uploads go from the multipart temp file (Starlette spools it to disk) straight into a
client-streaming call, 1 MiB at a time with a running sha256; downloads hand the server
stream to a StreamingResponse. No volume is ever held whole in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from labelgrid.activelearning.v1 import activelearning_service_pb2_grpc as al_grpc
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from labelgrid.inference.v1 import inference_service_pb2_grpc as inf_grpc
from labelgrid.training.v1 import training_service_pb2_grpc as train_grpc

from gateway.settings import GatewaySettings

_CORE_WRITE_ERROR = "Internal error from Core"
"""What grpc.aio reports when a client write fails after the server already ended the call."""

CHUNK_SIZE = 1024 * 1024
"""Largest chunk sent on a gRPC stream (the services refuse larger ones)."""


T = TypeVar("T")


class Readable(Protocol):
    """What an upload source offers: Starlette's UploadFile (reads off the event loop)."""

    async def read(self, size: int = -1) -> bytes: ...


@dataclass
class GrpcClients:
    """The gateway's channels and stubs; opened in the app's lifespan, closed at shutdown."""

    channels: list[grpc.aio.Channel]
    datastore: ds_grpc.DatastoreServiceStub
    inference: inf_grpc.InferenceServiceStub
    training: train_grpc.TrainingServiceStub
    activelearning: al_grpc.ActiveLearningServiceStub

    @classmethod
    def open(cls, settings: GatewaySettings) -> GrpcClients:
        options = [
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            # A restarted service is back in well under a second; gRPC's default reconnect
            # backoff (1 s, growing 1.6x) would keep answering 503 for seconds after it.
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 2_000),
            # Spread calls over every replica a headless Service resolves to (Kubernetes).
            ("grpc.lb_policy_name", "round_robin"),
        ]
        addresses = (
            settings.datastore_address,
            settings.inference_address,
            settings.training_address,
            settings.activelearning_address,
        )
        channels = [grpc.aio.insecure_channel(address, options=options) for address in addresses]
        unary, stream = settings.rpc_timeout_seconds, settings.stream_timeout_seconds
        return cls(
            channels,
            with_deadlines(_datastore_stub(channels[0]), unary, stream),
            with_deadlines(inf_grpc.InferenceServiceStub(channels[1]), unary, stream),
            with_deadlines(train_grpc.TrainingServiceStub(channels[2]), unary, stream),
            with_deadlines(al_grpc.ActiveLearningServiceStub(channels[3]), unary, stream),
        )

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self.channels))


def _message_or_wire(message: Any) -> bytes:
    """A request serialized, or bytes already in protobuf's wire format sent as they are (the
    chunk messages gateway.multipart builds without copying the chunk twice more)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


_WIRE_UPLOADS = {"UploadImage": ds_pb.UploadImageResponse, "UploadLabel": ds_pb.UploadLabelResponse}
"""The datastore's upload calls whose requests may be given in the wire format."""


def _datastore_stub(channel: grpc.aio.Channel) -> ds_grpc.DatastoreServiceStub:
    stub = ds_grpc.DatastoreServiceStub(channel)
    service = ds_pb.DESCRIPTOR.services_by_name["DatastoreService"].full_name
    for name, response in _WIRE_UPLOADS.items():
        method = channel.stream_unary(
            f"/{service}/{name}",
            request_serializer=_message_or_wire,
            response_deserializer=response.FromString,
            _registered_method=True,
        )
        setattr(stub, name, method)
    return stub


StubT = TypeVar("StubT")


def with_deadlines(stub: StubT, unary_timeout: float, stream_timeout: float) -> StubT:
    """`stub` with every method wrapped: a call made without `timeout` gets one (unary calls
    `unary_timeout`, streams `stream_timeout`), so no gateway call waits forever on a stuck
    service; a call that streams requests reports the server's own status when it refuses the
    stream early (see `_EarlyRefusal`)."""
    for name, method in list(vars(stub).items()):
        if isinstance(method, grpc.aio.UnaryUnaryMultiCallable):
            setattr(stub, name, _Deadline(method, unary_timeout, None))
        elif isinstance(method, grpc.aio.UnaryStreamMultiCallable):
            setattr(stub, name, _Deadline(method, stream_timeout, None))
        elif isinstance(method, grpc.aio.StreamUnaryMultiCallable):
            setattr(stub, name, _Deadline(method, stream_timeout, _StreamUnaryCall))
        elif isinstance(method, grpc.aio.StreamStreamMultiCallable):
            setattr(stub, name, _Deadline(method, stream_timeout, _StreamStreamCall))
    return stub


class _Deadline:
    """One stub method whose calls always carry a deadline."""

    def __init__(self, method: Any, timeout: float, wrap: Callable[[Any], Any] | None) -> None:
        self.method = method
        self.timeout = timeout
        self.wrap = wrap

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        call = self.method(*args, **kwargs)
        return call if self.wrap is None else self.wrap(call)


def _at_once(coroutine: Any) -> Any:
    """The value of a coroutine that finishes without waiting (a finished call's status parts)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    return None


class _EarlyRefusal:
    """grpc issue 36066: when a server ends a client-streaming call before the client has sent
    everything (a refused header, an upload over the limit, a full queue), grpc.aio may fail the
    client's next write and overwrite the server's status with INTERNAL "Internal error from
    Core", which the gateway would answer as a 500. The status that arrives first is the
    server's; it is kept here (a done callback runs on the first status) and raised instead."""

    def __init__(self, call: Any) -> None:
        self.first: grpc.aio.AioRpcError | None = None
        call.add_done_callback(self._done)

    def _done(self, call: Any) -> None:
        code = _at_once(call.code())
        if code is None or code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            return
        self.first = grpc.aio.AioRpcError(
            code,
            _at_once(call.initial_metadata()) or grpc.aio.Metadata(),
            _at_once(call.trailing_metadata()) or grpc.aio.Metadata(),
            details=_at_once(call.details()),
            debug_error_string=_at_once(call.debug_error_string()),
        )

    def error(self, err: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
        """The server's own error in place of a write failure that overwrote it."""
        if (
            err.code() is grpc.StatusCode.INTERNAL
            and err.details() == _CORE_WRITE_ERROR
            and self.first is not None
            and self.first.details() != _CORE_WRITE_ERROR
        ):
            return self.first
        return err


class _StreamUnaryCall:
    """A client-streaming call (uploads) that raises the server's status, not a write failure."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._refusal = _EarlyRefusal(call)

    def __await__(self) -> Any:
        return self._result().__await__()

    async def _result(self) -> Any:
        try:
            return await self._call
        except grpc.aio.AioRpcError as err:
            raise self._refusal.error(err) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _StreamStreamCall:
    """A bidirectional call (InferUpload) whose reads raise the server's status, not a write failure."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._refusal = _EarlyRefusal(call)

    async def read(self) -> Any:
        try:
            return await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise self._refusal.error(err) from None

    async def __aiter__(self) -> AsyncIterator[Any]:
        while (message := await self.read()) is not grpc.aio.EOF:
            yield message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


async def file_chunks(source: Readable) -> AsyncIterator[bytes]:
    """Reads `source` in ≤1 MiB chunks."""
    while True:
        data = await source.read(CHUNK_SIZE)
        if not data:
            return
        yield data


async def upload_stream(
    request_type: Callable[..., Any],
    header: Any,
    source: Readable,
    *,
    chunk_field: str = "chunk",
    finish_field: str = "finish",
    first: bool = True,
) -> AsyncIterator[Any]:
    """Messages of an upload RPC: header (if `first`), the file's chunks, then an unverified finish.

    As for image and label uploads (gateway.multipart): the REST client sent no checksum, so a
    sha256 hashed here, on the event loop, would check only this hop; the receiver hashes what it keeps.
    """
    if first:
        yield request_type(header=header)
    async for data in file_chunks(source):
        yield request_type(**{chunk_field: data})
    yield request_type(**{finish_field: common_pb2.UploadFinish(unverified=True)})


@dataclass
class Download:
    """An opened server stream: its first message (the info or result header) and the rest as bytes."""

    first: Any
    call: Any

    async def chunks(self) -> AsyncIterator[bytes]:
        """The remaining chunks; cancels the call if the HTTP client goes away mid-stream."""
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    return
                if message.WhichOneof("payload") == "chunk":
                    yield message.chunk
        finally:
            self.call.cancel()


async def open_download(start: Callable[[], Any]) -> Download:
    """Starts a server-streaming call and awaits its first message, so errors surface
    before the HTTP response starts (a 404 stays a 404, not a cut-off 200)."""
    call = start()
    try:
        first = await call.read()
    except BaseException:
        call.cancel()
        raise
    if first is grpc.aio.EOF:
        call.cancel()
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.INTERNAL,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="empty download stream",
        )
    return Download(first, call)


async def found_or_none(call: Awaitable[T]) -> T | None:
    """The answer of a lookup RPC, or None when the server says NOT_FOUND (other errors raise)."""
    try:
        return await call
    except grpc.aio.AioRpcError as err:
        if err.code() is grpc.StatusCode.NOT_FOUND:
            return None
        raise
