"""Chunked payloads on local disk, transport-neutral.

Uploads arrive as chunks of at most `CHUNK_SIZE`; `SpoolWriter` writes them to a temp
file as they come (constant memory), hashing and size-limiting on the way, so a volume is
never held whole in memory and a bad upload leaves nothing behind. Downloads read files
back as chunks with `iter_file_chunks`.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from services.common.errors import InvalidArgument, OutOfRange, ResourceExhausted

CHUNK_SIZE = 1024 * 1024
"""Largest chunk on the wire (1 MiB), well under the gRPC message limit."""

_HASH_READ_SIZE = 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writing the dirty pages of the range, do not wait


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) (the GIL is let go during the call), or None elsewhere."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


@dataclass(frozen=True)
class SpooledFile:
    """A complete, checksum-verified upload on local disk; its owner moves or deletes it."""

    path: Path
    size: int
    sha256: str


def normalize_sha256(value: str) -> str:
    """Lower-case hex from bare hex or ``SHA256:<hex>`` (any case); refuses anything else."""
    text = value.strip()
    if text[:7].lower() == "sha256:":
        text = text[7:]
    text = text.lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise InvalidArgument(f"not a sha256 hex digest: {value[:80]!r}")
    return text


def _discard_temp_file(file: BinaryIO, path: Path) -> None:
    try:
        file.close()
    finally:
        path.unlink(missing_ok=True)


class SpoolWriter:
    """Writes one upload's chunks to a temp file in `directory`, hashing as it goes.

    Not thread-safe; one upload, one writer. `finish` verifies and hands over the file;
    `abort` (or leaving a ``with`` block with an exception) removes it.
    """

    def __init__(
        self, directory: Path, max_bytes: int, *, fsync: bool = True, prefix: str = "upload-", writeback: bool = False
    ):
        directory = Path(directory)
        self.fsync = fsync  # False: the owner's store makes it durable (one fsync per upload, not two)
        # True: each batch of `write_many` is sent to the disk while the next arrives, so the
        # one fsync at the end (here or the owner's) waits for the last batch only.
        self.writeback = writeback and _sync_file_range is not None
        self._written_back = 0
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.max_bytes = max_bytes
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=directory)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        # Safety net: a writer dropped without finish or abort (e.g. its task was cancelled
        # mid-cleanup) still removes its temp file when it is garbage-collected.
        self._discard = weakref.finalize(self, _discard_temp_file, self._file, self.path)
        self._hash = hashlib.sha256()
        self._size = 0
        self._done = False

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    def write(self, data: bytes | memoryview) -> None:
        if self._done:
            raise InvalidArgument("the upload is already finished or aborted")
        if len(data) > CHUNK_SIZE:
            self.abort()
            raise InvalidArgument(f"chunk of {len(data)} bytes exceeds the chunk limit of {CHUNK_SIZE} bytes")
        if self._size + len(data) > self.max_bytes:
            self.abort()
            raise ResourceExhausted(
                f"upload exceeds the limit of {self.max_bytes} bytes",
                reason="PAYLOAD_TOO_LARGE",
                metadata={"limit_bytes": str(self.max_bytes)},
            )
        self._file.write(data)
        self._hash.update(data)
        self._size += len(data)

    def write_many(self, chunks: Iterable[bytes | memoryview]) -> None:
        """`write` of each chunk in turn: a batch of chunks for one worker-thread hop; with
        `writeback`, the disk then starts writing the batch (sync_file_range, no waiting)."""
        for chunk in chunks:
            self.write(chunk)
        if self.writeback and self._size > self._written_back:
            self._file.flush()
            assert _sync_file_range is not None
            _sync_file_range(
                self._file.fileno(), self._written_back, self._size - self._written_back, _SYNC_FILE_RANGE_WRITE
            )
            self._written_back = self._size

    def finish(self, expected_sha256: str | None = None) -> SpooledFile:
        """Verifies the checksum (None: the sender sent none) and fsyncs (unless made with
        fsync=False); any failure removes the temp file."""
        if self._done:
            raise InvalidArgument("the upload is already finished or aborted")
        try:
            actual = self._hash.hexdigest()
            expected = actual if expected_sha256 is None else normalize_sha256(expected_sha256)
            if actual != expected:
                raise InvalidArgument(
                    f"sha256 mismatch: the client sent {expected}, the received bytes hash to {actual}",
                    reason="CHECKSUM_MISMATCH",
                    metadata={"expected_sha256": expected, "actual_sha256": actual},
                )
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self._file.close()
        except BaseException:
            self.abort()
            raise
        self._discard.detach()
        self._done = True
        return SpooledFile(self.path, self._size, actual)

    def abort(self) -> None:
        """Removes the temp file; safe to call more than once, and after `finish` is a no-op."""
        if self._done:
            return
        self._done = True
        self._discard()

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()


def iter_file_chunks(path: Path, offset: int = 0, limit: int = 0, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yields `limit` bytes (0 = to the end) of `path` from `offset`, `chunk_size` at a time.

    The range is checked now, before the first chunk is asked for, so a caller can refuse
    the request before it sends any header; an offset past the end is OutOfRange (an offset
    equal to the size reads nothing). The chunks come from a generator, so the file is
    closed when the consumer closes it early.
    """
    if offset < 0 or limit < 0:
        raise InvalidArgument("offset and limit must not be negative")
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    size = os.stat(path).st_size
    if offset > size:
        raise OutOfRange(
            f"read offset {offset} lies beyond the end of the file ({size} bytes)",
            metadata={"offset": str(offset), "size_bytes": str(size)},
        )
    return _read_chunks(path, offset, limit, chunk_size)


def _read_chunks(path: Path, offset: int, limit: int, chunk_size: int) -> Iterator[bytes]:
    remaining = limit if limit > 0 else None
    with open(path, "rb") as file:
        file.seek(offset)
        while remaining is None or remaining > 0:
            data = file.read(chunk_size if remaining is None else min(chunk_size, remaining))
            if not data:
                return
            if remaining is not None:
                remaining -= len(data)
            yield data


def sha256_file(path: Path) -> str:
    """Lower-case hex sha256 of a file, read in constant memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while data := file.read(_HASH_READ_SIZE):
            digest.update(data)
    return digest.hexdigest()


async def finish_spool(spool: SpoolWriter, expected_sha256: str | None = None) -> SpooledFile:
    """`spool.finish` (hash check and fsync) in a worker thread; a cancelled caller leaves no file.

    The thread cannot be stopped, so on cancellation the file it hands over is removed then.
    """
    finishing = asyncio.ensure_future(asyncio.to_thread(spool.finish, expected_sha256))
    try:
        return await asyncio.shield(finishing)
    except asyncio.CancelledError:
        finishing.add_done_callback(_remove_unclaimed)
        raise


def _remove_unclaimed(finishing: asyncio.Future[SpooledFile]) -> None:
    if not finishing.cancelled() and finishing.exception() is None:
        finishing.result().path.unlink(missing_ok=True)
