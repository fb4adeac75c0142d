"""Chunk streams on the wire, for every servicer.

Every upload RPC of every labelgrid service has the same shape: a message with a
`payload` oneof whose first message is `header`, then `chunk`s of at most 1 MiB, then a
`finish` carrying the sha256. Every download streams a `BlobInfo` as `info`, then
`chunk`s. These helpers drive that shape over the transport-neutral spool and readers
of `services.common.chunks`, with disk I/O off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from services.common.chunks import SpooledFile, SpoolWriter, finish_spool
from services.common.errors import InvalidArgument
from services.common.resource_names import check_required

Header = TypeVar("Header")
Response = TypeVar("Response")

WRITE_BATCH_BYTES = 2 * 1024 * 1024
"""Bytes of received chunks one worker-thread hop of `receive_upload` writes and hashes."""


class ChunkMessage:
    """A chunk message of an upload stream, read without copying its bytes (see `chunk_views`)."""

    __slots__ = ("chunk",)

    def __init__(self, chunk: memoryview) -> None:
        self.chunk = chunk

    def WhichOneof(self, oneof: str) -> str:  # the protobuf message's method
        return "chunk"


def chunk_tag(message_type: Any) -> bytes:
    """The wire tag of an upload message's `chunk` field (bytes: length-delimited); one byte,
    which the gateway's hand-built chunk messages and `chunk_views` rely on."""
    number = message_type.DESCRIPTOR.fields_by_name["chunk"].number
    if number >= 16:
        raise ValueError(f"{message_type.__name__}.chunk is field {number}: its tag is not one byte")
    return bytes([number << 3 | 2])


def chunk_views(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer for an upload stream of `message_type` whose chunk messages are
    not copied: a message that holds only its `chunk` field (all but the first and last of an
    upload) becomes a `ChunkMessage` viewing the received bytes. Protobuf's parse copies the
    bytes into the message and reading `.chunk` copies them again: two of the three copies
    of every uploaded byte in the service. Any other message is parsed by protobuf as before.
    """
    tag = chunk_tag(message_type)
    parse = message_type.FromString

    def deserialize(raw: bytes) -> Any:
        if raw[:1] == tag:
            length, start, shift = 0, 1, 0
            while start < len(raw) and shift < 35:  # the length: a varint of at most 5 bytes
                byte = raw[start]
                length |= (byte & 0x7F) << shift
                start += 1
                shift += 7
                if byte < 0x80:
                    if start + length == len(raw):  # the chunk is the whole message
                        return ChunkMessage(memoryview(raw)[start:])
                    break
        return parse(raw)

    return deserialize


def finish_sha256(finish: Any, message: str, what: str) -> str | None:
    """The sha256 an UploadFinish asks the receiver to verify, None when it is `unverified`
    (the receiver keeps the sha256 it computes); refuses a finish that has both or neither."""
    if finish.unverified:
        if finish.sha256:
            raise InvalidArgument(f"{message} is unverified, so it must not carry a sha256")
        return None
    if not finish.sha256:
        raise InvalidArgument(f"{message} must carry the sha256 of {what}")
    return str(finish.sha256)


async def receive_upload(
    requests: AsyncIterable[Any], open_spool: Callable[[Any], SpoolWriter]
) -> tuple[Any, SpooledFile]:
    """Reads header, chunks and finish into a verified spooled file.

    A header missing a REQUIRED field (google.api.field_behavior) is refused before anything is
    spooled. `open_spool(header)` makes the spool (it may refuse a declared size early). If the
    stream is malformed, too large, fails its checksum, or the client hangs up, the
    spool is removed and nothing is left behind.
    """
    iterator = requests.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        raise InvalidArgument("empty upload stream: the first message must be the header") from None
    if first.WhichOneof("payload") != "header":
        raise InvalidArgument("the first message of an upload stream must be the header")
    header = first.header
    check_required(header)
    spool = await asyncio.to_thread(open_spool, header)
    writing: asyncio.Future[None] | None = None
    try:
        finished = False
        expected: str | None = None
        # Chunks are written and hashed in a worker thread while the next ones are received,
        # WRITE_BATCH_BYTES of them per thread hop (a hop per 1 MiB chunk cost a thread switch
        # and an event-loop wakeup per message); one batch in flight at a time, so the spool
        # sees the chunks in order and at most two batches are held per upload.
        batch: list[Any] = []
        batched = 0
        async for message in iterator:
            kind = message.WhichOneof("payload")
            if finished:
                raise InvalidArgument("nothing may follow the finish message of an upload stream")
            if kind == "chunk":
                chunk = message.chunk
                batch.append(chunk)
                batched += len(chunk)
                if batched >= WRITE_BATCH_BYTES:
                    if writing is not None:
                        await writing
                    writing = asyncio.ensure_future(asyncio.to_thread(spool.write_many, batch))
                    batch, batched = [], 0
            elif kind == "finish":
                expected = finish_sha256(message.finish, "the finish message", "the upload")
                finished = True
            else:
                raise InvalidArgument(f"unexpected {kind or 'empty'} message in the middle of an upload stream")
        if writing is not None:
            await writing
        if batch:
            writing = asyncio.ensure_future(asyncio.to_thread(spool.write_many, batch))
            await writing
        if not finished:
            raise InvalidArgument("the upload stream ended without a finish message carrying its sha256")
        spooled = await finish_spool(spool, expected)
    except BaseException:
        # Also on CancelledError: a client that hangs up leaves no temp file behind. Called
        # directly (a close and an unlink): an await here would itself be cancelled. A write
        # still in flight finishes first (close takes the file's lock); its outcome is dropped.
        if writing is not None:
            writing.add_done_callback(_drop_outcome)
        spool.abort()
        raise
    return header, spooled


def _drop_outcome(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: the upload has failed already


HOP_BYTES = 8 * 1024 * 1024
"""Bytes of chunks one worker-thread hop of `send_chunks` reads (8 chunks of 1 MiB)."""


def take_chunks(chunks: Iterator[bytes], limit: int = HOP_BYTES) -> list[bytes]:
    """The next chunks of `chunks`, about `limit` bytes of them; [] at the end.

    A source with a `take(limit)` method (a read-ahead buffer) answers from what it has
    already read, waiting only for the first chunk.
    """
    take = getattr(chunks, "take", None)
    if take is not None:
        return take(limit)
    batch: list[bytes] = []
    size = 0
    for chunk in chunks:
        batch.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return batch


async def send_chunks(
    first: Response, chunks: Iterator[bytes], make: Callable[[bytes], Response]
) -> AsyncIterator[Response]:
    """Yields `first`, then one message per chunk, reading the chunks off the event loop up
    to HOP_BYTES per worker-thread hop (one hop per 1 MiB chunk cost a thread switch and an
    event-loop wakeup per message)."""
    yield first
    try:
        while True:
            batch = await asyncio.to_thread(take_chunks, chunks)
            if not batch:
                return
            for chunk in batch:
                yield make(chunk)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            # Releases the file or the S3 connection when the client stops reading early;
            # called directly because an await in a cancelled generator would not run.
            close()
