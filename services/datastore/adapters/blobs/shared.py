"""What both blob stores share: the constants, key validation, argument checks, the chunked
read stream and the spool-folder housekeeping.
"""

from __future__ import annotations

import fcntl
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument, StorageError
from services.datastore.domain.ports import REPLACED_AREA, replaced_original_key

CHUNK_SIZE = 1024 * 1024
"""Largest chunk `open_read` yields (1 MiB), the gRPC chunk size."""

MONAILABEL_IMAGE_EXTS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".jpg", ".png", ".tif", ".svs", ".xml", ".zip")
"""MONAI Label's MONAI_LABEL_DATASTORE_FILE_EXT, plus our zipped DICOM series."""

MAX_URL_EXPIRY_SECONDS = 7 * 24 * 3600
"""S3 (SigV4) presigned URLs live at most 7 days."""

STALE_SPOOL_SECONDS = 3600.0
"""Spool files untouched this long are crash leftovers; younger ones may be another process's live upload."""

_RESERVED_ROOT_NAMES = frozenset({"datastore_v2.json", ".lock", "labels", ".labelgrid"})
_MAX_NAME_BYTES = 255


def _split_key(key: str) -> list[str]:
    """Validates a logical key's shape and returns its parts; InvalidArgument otherwise.

    Callers validate ids already; this is defense in depth, and it keeps both stores
    agreeing on which keys exist (an image key the local layout could not list is refused).
    """
    if not isinstance(key, str) or not key:
        raise InvalidArgument("blob key must be a non-empty string")
    if "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidArgument(f"blob key {key!r} contains a backslash or a control character")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidArgument(f"blob key {key!r} has an empty, '.' or '..' component")
    if any(part.startswith(".") for part in parts):
        raise InvalidArgument(f"blob key {key!r} has a hidden ('.'-prefixed) component")
    if any(len(part.encode()) > _MAX_NAME_BYTES for part in parts):
        raise InvalidArgument(f"blob key {key!r} has a component longer than {_MAX_NAME_BYTES} bytes")
    area = parts[0]
    if area == "images" and len(parts) == 2:
        if not parts[1].endswith(MONAILABEL_IMAGE_EXTS):
            raise InvalidArgument(
                f"blob key {key!r}: image files must end with one of {', '.join(MONAILABEL_IMAGE_EXTS)}"
            )
        return parts
    if area == "labels" and len(parts) == 3:
        return parts
    if area == "models" and len(parts) >= 4:
        return parts
    if area == "sessions" and len(parts) == 2:
        return parts
    if area == REPLACED_AREA and len(parts) >= 3:
        original = replaced_original_key(key)
        if original.split("/", 1)[0] in ("images", "labels"):
            _split_key(original)
            return parts
    raise InvalidArgument(
        f"blob key {key!r} is not images/<file>, labels/<tag>/<file>, models/<name>/<version>/<file> or sessions/<file>"
    )


def _check_sha256(sha256: str) -> str:
    """The digest travels as S3 user metadata (ASCII only): accept lower/upper hex, store lower."""
    if not isinstance(sha256, str) or len(sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha256):
        raise InvalidArgument(f"sha256 must be 64 hex digits, got {sha256!r}")
    return sha256.lower()


def _check_expiry(expires_seconds: int) -> None:
    if not 1 <= expires_seconds <= MAX_URL_EXPIRY_SECONDS:
        raise InvalidArgument(f"expires_seconds must be between 1 and {MAX_URL_EXPIRY_SECONDS} (7 days)")


def _check_range(offset: int, length: int | None) -> None:
    if offset < 0:
        raise InvalidArgument(f"read offset may not be negative (got {offset})")
    if length is not None and length < 0:
        raise InvalidArgument(f"read length may not be negative (got {length})")


class _ChunkStream(Iterator[bytes]):
    """Chunks read from an already-open source; closing it (or dropping it) releases the source.

    A class, not a generator, so a missing object fails at `open_read` time and a stream
    that is never iterated still releases its file or connection on `close()`.
    """

    def __init__(self, read: Any, release: Any, remaining: int | None):
        self._read = read
        self._release = release
        self._remaining = remaining
        self._closed = False

    def __iter__(self) -> _ChunkStream:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise StopIteration
        want = CHUNK_SIZE if self._remaining is None else min(CHUNK_SIZE, self._remaining)
        if want <= 0:
            self.close()
            raise StopIteration
        try:
            data = self._read(want)
        except BaseException as exc:
            self.close()
            if isinstance(exc, (OSError, ValueError)) or type(exc).__module__.startswith(("urllib3", "minio")):
                raise StorageError(f"reading the object failed: {exc}") from exc
            raise
        if not data:
            self.close()
            raise StopIteration
        if self._remaining is not None:
            self._remaining -= len(data)
        return bytes(data)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self) -> _ChunkStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


_SPOOL_LOCKS: dict[Path, int] = {}
"""The lock file of each spool folder this process uses, held (shared) while it lives."""


def _remove_stale(directory: Path, older_than: float = STALE_SPOOL_SECONDS) -> None:
    """Removes spool leftovers of a crash, never a live upload of another process on the same folder.

    Every process using the folder holds a shared flock on `<folder>.lock` (beside it, so the
    folder holds spools only) for as long as it lives. A process that starts while no other
    holds it is alone: everything in the folder is a leftover and goes. While another process
    (a replica, a reindex CLI next to a live server) holds it, nothing is removed: its uploads
    may be slow, so age cannot tell them apart (`fsck --repair` clears old leftovers then). A
    second store of the same process on the folder removes only what is older than `older_than`.
    """
    directory = directory.resolve()
    known = directory in _SPOOL_LOCKS
    if not known:
        _SPOOL_LOCKS[directory] = os.open(directory.parent / f"{directory.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fd = _SPOOL_LOCKS[directory]
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fcntl.flock(fd, fcntl.LOCK_SH)  # live here too from now on
        return  # another process lives on this folder: its spools are not ours to judge
    try:
        cutoff = time.time() - older_than if known else math.inf
        for entry in directory.iterdir():
            try:
                if entry.lstat().st_mtime >= cutoff:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            except OSError:
                pass
    finally:
        fcntl.flock(fd, fcntl.LOCK_SH)


def _file_mode() -> int:
    """0o666 minus the umask, as files MONAI Label writes get (mkstemp spools are 0o600).

    Read from /proc: `os.umask` can only be read by setting it, a race with other threads.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def _discard(path: Path) -> None:
    """Consumes a put_file source whatever happened; never removes a folder passed by mistake."""
    try:
        if not path.is_dir():
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
