"""A spool that the blob store starts storing while the upload still arrives.

On S3 a stored upload was two passes one after the other: receive the whole file into the
spool, then `put_file` sent it to the object store (REST uploads at ~0.65x the raw SDK). With
a blob store that offers `streamed_put` (S3BlobStore), `StreamingSpool` hands it every full
part as soon as it is on disk, so sending overlaps receiving; the checks stay as they were
(sha256 at finish, the format check on the whole spool, then `put_file`, which completes
the object), and any failure aborts the multipart upload: nothing half-written is visible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, cast

from services.common.chunks import SpoolWriter


class StreamedPut(Protocol):
    def wants(self, size: int) -> bool: ...

    def advance(self, size: int) -> None: ...

    def abort(self) -> None: ...


class StreamingStore(Protocol):
    def streamed_put(self, key: str, path: Path, expected_size: int) -> StreamedPut: ...

    def release_streamed(self, path: Path) -> None: ...


def streaming_store(blobs: object) -> StreamingStore | None:
    """`blobs` when it can store a spool while it is written (`can_stream_puts`), else None."""
    return cast(StreamingStore, blobs) if getattr(blobs, "can_stream_puts", False) else None


class StreamingSpool(SpoolWriter):
    """A SpoolWriter whose full parts go to `store.streamed_put(key, ...)` as they are written."""

    def __init__(self, store: StreamingStore, key: str, directory: Path, max_bytes: int, expected_size: int) -> None:
        super().__init__(directory, max_bytes, fsync=False)
        try:
            self._put = store.streamed_put(key, self.path, expected_size or max_bytes)
        except BaseException:
            super().abort()
            raise

    def write(self, data: bytes | memoryview) -> None:
        super().write(data)
        if self._put.wants(self.size):
            try:
                self._file.flush()  # the part is read back from the file by the store's threads
                self._put.advance(self.size)
            except BaseException:
                self.abort()
                raise

    def abort(self) -> None:
        super().abort()
        self._put.abort()
