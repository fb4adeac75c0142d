"""A multipart/form-data upload read as it arrives, straight into a gRPC upload stream.

Starlette's form parser spools every file part to a temp file (one thread hop per network
read) before the route runs; the route then read it back into the gRPC stream: two passes
over the bytes. Here python-multipart's streaming parser (the one Starlette uses) splits the
request body while it is received, and the file part's bytes go on to the upload call in
≤1 MiB messages. No temp file in the gateway, and no hash: the datastore hashes what it
stores (the client sent no checksum to check).

MONAI Label's clients send the form fields (`params`) before the file, and the upload's
header (which carries them) must be the first message; a form whose file comes before its
fields is still accepted: its file part is then buffered (memory, then a temp file) until the
body has ended, and sent from there.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from labelgrid.common.v1 import common_pb2
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from gateway.clients import CHUNK_SIZE
from gateway.errors import GatewayError
from gateway.routes.common import MAX_JSON_BYTES, base_name
from services.common.streams import chunk_tag

MAX_PARTS = 64
"""Parts accepted in one upload form (MONAI Label's forms have two or three)."""
_MEMORY_SPOOL = CHUNK_SIZE
"""A file part that comes before the fields stays in memory up to this, then on disk."""


class HungUp(GatewayError):
    """The HTTP client went away before the body ended; nothing is stored (nobody reads the answer)."""

    def __init__(self) -> None:
        super().__init__(400, "the client hung up before the upload ended")


@dataclass
class _Part:
    name: str = ""
    file_name: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    value: bytearray = field(default_factory=bytearray)


# Events the parser's callbacks queue: ("part", _Part) when a part's headers are read,
# ("data", bytes), ("end", None) at a part's end.
_Event = tuple[str, Any]


class FormStream:
    """The parts of one multipart request body, in order, as the body arrives."""

    def __init__(self, request: Request, file_field: str) -> None:
        content_type, options = parse_options_header(request.headers.get("content-type", ""))
        if content_type != b"multipart/form-data" or not options.get(b"boundary"):
            raise GatewayError(422, f"the upload must be a multipart/form-data body with a {file_field!r} file part")
        self.request = request
        self.file_field = file_field
        self.fields: dict[str, str] = {}
        self.file_name: str | None = None
        self._events: deque[_Event] = deque()
        self._part = _Part()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._parts = 0
        self._body = request.stream()
        self._ended = False
        self._parser = MultipartParser(
            options[b"boundary"],
            {
                "on_part_begin": self._on_part_begin,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
            },
        )

    # -- parser callbacks (synchronous; they only queue) --------------------------------

    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise GatewayError(422, f"an upload form may have at most {MAX_PARTS} parts")
        self._part = _Part()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._part.headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._part.headers.get(b"content-disposition", b""))
        self._part.name = options.get(b"name", b"").decode("latin-1")
        if b"filename" in options:
            self._part.file_name = options[b"filename"].decode("utf-8", "replace")
        self._events.append(("part", self._part))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        # A view, not a copy: the body chunk is immutable; file_data joins views once.
        self._events.append(("data", memoryview(data)[start:end]))

    def _on_part_end(self) -> None:
        self._events.append(("end", None))

    # -- reading -----------------------------------------------------------------------

    async def _next_event(self) -> _Event | None:
        """The next parser event, reading more of the body when none is queued; None at its end."""
        while not self._events:
            if self._ended:
                return None
            try:
                chunk = await self._body.__anext__()
            except StopAsyncIteration:
                chunk = b""
            except ClientDisconnect:
                raise HungUp() from None
            try:
                if chunk:
                    self._parser.write(chunk)
                else:
                    self._ended = True
                    self._parser.finalize()
            except MultipartParseError as err:
                raise GatewayError(422, f"malformed multipart body: {err}") from None
        return self._events.popleft()

    async def _read_field(self, part: _Part) -> None:
        """A non-file part: kept (bounded) when it is a form field, skipped otherwise."""
        keep = part.file_name is None
        while (event := await self._next_event()) is not None and event[0] == "data":
            if keep:
                part.value += event[1]
                if len(part.value) > MAX_JSON_BYTES:
                    raise GatewayError(413, f"the {part.name} field is over the limit of {MAX_JSON_BYTES} bytes")
        if keep:
            self.fields.setdefault(part.name, part.value.decode("utf-8", "replace"))

    async def until_file(self) -> bool:
        """Reads the parts before the file part (their fields land in `fields`); True when the
        file part has begun, False when the body ended without one."""
        while (event := await self._next_event()) is not None:
            if event[0] != "part":
                continue
            part: _Part = event[1]
            if part.name == self.file_field and part.file_name is not None:
                self.file_name = base_name(part.file_name)
                return True
            await self._read_field(part)
        return False

    async def file_data(self) -> AsyncIterator[list[memoryview]]:
        """The file part's bytes as they arrive, in pieces (views of the received body, not
        copies) of CHUNK_SIZE bytes together; the last may hold less."""
        pieces: list[memoryview] = []
        size = 0
        while (event := await self._next_event()) is not None and event[0] == "data":
            view: memoryview = event[1]
            while size + len(view) >= CHUNK_SIZE:
                cut = CHUNK_SIZE - size
                pieces.append(view[:cut])
                yield pieces
                pieces, size, view = [], 0, view[cut:]
            if view:
                pieces.append(view)
                size += len(view)
        if size:
            yield pieces

    async def rest(self) -> None:
        """Reads the parts after the file to the end of the body (fields land in `fields`)."""
        while (event := await self._next_event()) is not None:
            if event[0] == "part":
                await self._read_field(event[1])


async def _buffered(form: FormStream) -> tempfile.SpooledTemporaryFile[bytes]:
    """The file part in a spooled temp file (a form whose fields come after its file)."""
    buffer: tempfile.SpooledTemporaryFile[bytes] = tempfile.SpooledTemporaryFile(_MEMORY_SPOOL)  # noqa: SIM115 - closed by the caller
    try:
        async for pieces in form.file_data():
            if buffer._rolled:  # type: ignore[attr-defined]  # on disk: write off the event loop
                await asyncio.to_thread(buffer.writelines, pieces)
            else:
                buffer.writelines(pieces)
        await form.rest()
        buffer.seek(0)
    except BaseException:
        buffer.close()
        raise
    return buffer


async def upload_form(
    request: Request,
    file_field: str,
    what: str,
    make_header: Callable[[dict[str, str], str], Any],
    start_call: Callable[[AsyncIterator[Any]], Any],
    request_type: Callable[..., Any],
) -> Any:
    """Streams the form's file part into an upload call and returns the call's response.

    `make_header(fields, file_name)` builds the header from the form fields read so far (it
    may refuse them: nothing has been sent yet); `start_call(messages)` starts the gRPC call.
    An empty file is a 422 before any call. A client that hangs up mid-body cancels the
    call before its finish message, so the service stores nothing.
    """
    form = FormStream(request, file_field)
    if not await form.until_file():
        raise GatewayError(422, f"the {what} upload needs a {file_field!r} file part")
    file_name = form.file_name
    if not file_name:
        raise GatewayError(422, f"the {what} upload needs a file name (its extension selects the format)")
    buffer = None
    if "params" in form.fields:
        chunks = form.file_data()
    else:  # no fields yet: they may follow the file, and the header must be sent first
        buffer = await _buffered(form)
        chunks = _read_buffer(buffer)
    try:
        header = make_header(form.fields, file_name)
        first: list[memoryview] = await anext(chunks, [])
        if not first:
            raise GatewayError(422, f"the {what} file {file_name!r} is empty")
        failure: list[BaseException] = []
        tag = chunk_tag(request_type)

        async def messages() -> AsyncIterator[Any]:
            yield request_type(header=header)
            pieces: list[memoryview] | None = first
            try:
                while pieces is not None:
                    yield _chunk_message(tag, pieces)
                    pieces = await anext(chunks, None)
                if buffer is None:
                    await form.rest()
            except GeneratorExit:
                raise  # gRPC stopped reading: the call has ended, its status is the answer
            except BaseException as err:
                failure.append(err)
                raise  # gRPC cancels the call: no finish, nothing stored
            # MONAI Label's clients send no checksum: a sha256 hashed here would only check
            # this hop (cost 7-14% of an upload); the datastore hashes what it stores.
            yield request_type(finish=common_pb2.UploadFinish(unverified=True))

        try:
            return await start_call(messages())
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            if failure:
                raise failure[0] from None
            raise
    finally:
        if buffer is not None:
            buffer.close()


async def _read_buffer(buffer: Any) -> AsyncIterator[list[memoryview]]:
    while data := await asyncio.to_thread(buffer.read, CHUNK_SIZE):
        yield [memoryview(data)]


def _chunk_message(tag: bytes, pieces: list[memoryview]) -> bytes:
    """A request holding only `chunk` = the pieces joined, already in protobuf's wire format
    (the datastore client sends bytes as they are: gateway.clients).

    The pieces are copied once, here; building the message and serializing it would copy
    them twice more."""
    size = sum(map(len, pieces))
    length = bytearray()
    while size > 0x7F:
        length.append(size & 0x7F | 0x80)
        size >>= 7
    length.append(size)
    return b"".join([tag, length, *pieces])
