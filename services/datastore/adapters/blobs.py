"""Blob stores: where image, label and model bytes live, behind one small interface.

Why two: `LocalBlobStore` keeps MONAI Label's own studies-folder layout, so an existing
folder is adopted as is and MONAI Label can still open it afterwards; `S3BlobStore` is for
clusters. Both take finished, already-validated local files (`put_file`) so a half-written
upload is never visible, and both stream reads in chunks of at most 1 MiB so memory stays
constant whatever the volume size. Both are synchronous and safe to share between threads.

Logical keys: ``images/<file>``, ``labels/<tag>/<file>``, ``models/<name>/<version>/<file>``.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable
from urllib.parse import urlsplit

from services.common.errors import InvalidArgument, NotFound, StorageError

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
_S3_PART_SIZE = 16 * 1024 * 1024
_S3_MAX_PARTS = 10_000
_S3_PARALLEL_UPLOADS = 2


@dataclass(frozen=True)
class BlobInfo:
    """One stored object; `sha256` is None where the store does not keep it (local files, S3 listings)."""

    key: str
    size: int
    sha256: str | None
    mtime: float


@runtime_checkable
class BlobStore(Protocol):
    """What the datastore needs from a byte store; see the module docstring for the keys."""

    def put_file(self, key: str, path: Path, *, sha256: str, content_type: str = "application/octet-stream") -> None:
        """Atomically makes `path` the object `key` (replacing any old one).

        `path` is consumed whatever happens (moved in, or deleted on failure); on failure the
        old object, if any, is left exactly as it was.
        """
        ...

    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Chunks (≤1 MiB) of the object from `offset`, `length` bytes or to the end.

        NotFound is raised by the call itself, not on first iteration; an offset at or past
        the end yields nothing. `close()` on the result releases the file or connection.
        """
        ...

    def stat(self, key: str) -> BlobInfo: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> bool:
        """True if something was deleted, False if there was nothing."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """How many objects were deleted; an empty prefix is refused."""
        ...

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        """Every object whose key starts with `prefix`, recursively, sorted by key."""
        ...

    def presigned_get_url(self, key: str, expires_seconds: int) -> str:
        """A URL that reads the object without this service (S3: signed GET; local: file://)."""
        ...

    def spool_dir(self) -> Path:
        """Where callers spool uploads so that `put_file` is cheap."""
        ...


# -- shared helpers --------------------------------------------------------------------


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
    raise InvalidArgument(
        f"blob key {key!r} is not images/<file>, labels/<tag>/<file> or models/<name>/<version>/<file>"
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


def _remove_stale(directory: Path, older_than: float = STALE_SPOOL_SECONDS) -> None:
    """Removes spool leftovers of a crash, never a live upload of another process on the same folder.

    An upload being written keeps its mtime fresh, so age tells leftovers apart (a reindex
    CLI run next to a live server must not delete the server's uploads).
    """
    cutoff = time.time() - older_than
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


# -- local -----------------------------------------------------------------------------


class LocalBlobStore:
    """Objects as files in a MONAI Label studies folder.

    ``images/<f>`` is ``<root>/<f>``; ``labels/<tag>/<f>`` is ``<root>/labels/<tag>/<f>``;
    ``models/...`` live in ``<root>/.labelgrid/models/...`` and spool files in
    ``<root>/.labelgrid/tmp`` (same filesystem, so `put_file` is a rename).
    """

    def __init__(self, root: Path, *, stale_spool_seconds: float = STALE_SPOOL_SECONDS):
        self.root = Path(root).resolve()
        self._mode = _file_mode()
        self._state = self.root / ".labelgrid"
        self._models = self._state / "models"
        self._tmp = self._state / "tmp"
        self._labels = self.root / "labels"
        self._lock = threading.Lock()  # orders mkdir/replace against empty-dir pruning
        try:
            for directory in (self.root, self._labels / "final", self._labels / "original", self._models, self._tmp):
                directory.mkdir(parents=True, exist_ok=True)
            _remove_stale(self._tmp, stale_spool_seconds)
        except OSError as exc:
            raise StorageError(f"cannot prepare the studies folder {self.root}: {exc}") from exc

    # keys <-> paths

    def _path(self, key: str) -> Path:
        parts = _split_key(key)
        if parts[0] == "images":
            name = parts[1]
            if name in _RESERVED_ROOT_NAMES:
                raise InvalidArgument(f"blob key {key!r} names a reserved file of the studies folder")
            path = self.root / name
        elif parts[0] == "labels":
            path = self._labels / parts[1] / parts[2]
        else:
            path = self._models.joinpath(*parts[1:])
        # Defense in depth: a symlinked folder must not lead outside the root either. The file
        # itself may be a symlink (adopted folders often link images in); the link is the object.
        resolved = path.parent.resolve() / path.name
        if not resolved.is_relative_to(self.root):
            raise InvalidArgument(f"blob key {key!r} resolves outside the studies folder")
        return path

    def _key_for(self, path: Path) -> str | None:
        """The key of a file found on disk, or None when it is not an object (or not one we could address)."""
        key = self._layout_key(path)
        if key is None:
            return None
        try:
            _split_key(key)
        except InvalidArgument:
            return None  # e.g. a backslash in a file name: listed, it would fail every other call
        return key

    def _layout_key(self, path: Path) -> str | None:
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return None
        parts = rel.parts
        if any(p.startswith(".") for p in parts[:1]) and parts[0] != ".labelgrid":
            return None
        if len(parts) == 1:
            name = parts[0]
            if name.startswith(".") or name in _RESERVED_ROOT_NAMES or not name.endswith(MONAILABEL_IMAGE_EXTS):
                return None
            return f"images/{name}"
        if parts[0] == "labels" and len(parts) == 3 and not parts[1].startswith(".") and not parts[2].startswith("."):
            return f"labels/{parts[1]}/{parts[2]}"
        if parts[:2] == (".labelgrid", "models") and len(parts) >= 5:
            if any(p.startswith(".") for p in parts[2:]):
                return None
            return "models/" + "/".join(parts[2:])
        return None

    # writes

    def put_file(self, key: str, path: Path, *, sha256: str, content_type: str = "application/octet-stream") -> None:
        """fsync, then rename over the old object, then fsync the folder; `path` is consumed."""
        source = Path(path)
        staged: Path | None = None
        try:
            target = self._path(key)
            _check_sha256(sha256)
            if not source.is_file():
                raise StorageError(f"cannot store {key!r}: the source {source} is not a file")
            if source.stat().st_dev != self._tmp.stat().st_dev:
                # Another filesystem: copy next to the target first, so the final step is still a rename.
                fd, name = tempfile.mkstemp(prefix="put-", suffix=".part", dir=self._tmp)
                staged = Path(name)
                with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                    shutil.copyfileobj(src, out, CHUNK_SIZE)
                source.unlink(missing_ok=True)
                source = staged
            fd = os.open(source, os.O_RDONLY)
            try:
                os.fchmod(fd, self._mode)  # spools are 0o600; MONAI Label (maybe another user) reads these
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._lock:
                created = not target.parent.exists()
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
                _fsync_dir(target.parent)
                if created:
                    _fsync_dir(target.parent.parent)
        except (InvalidArgument, StorageError):
            raise
        except OSError as exc:
            raise StorageError(f"cannot store {key!r}: {exc}") from exc
        finally:
            _discard(Path(path))
            if staged is not None:
                _discard(staged)

    def delete(self, key: str) -> bool:
        path = self._path(key)
        with self._lock:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            except IsADirectoryError:
                return False
            except OSError as exc:
                raise StorageError(f"cannot delete {key!r}: {exc}") from exc
            self._prune(path.parent)
        return True

    def _prune(self, directory: Path) -> None:
        """Removes empty model version/name folders; label and root folders stay (MONAI Label expects them)."""
        while directory != self._models and directory.is_relative_to(self._models):
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def delete_prefix(self, prefix: str) -> int:
        """Deletes every object under `prefix`; an empty prefix is refused."""
        if not prefix:
            raise InvalidArgument("delete_prefix needs a prefix: refusing to delete the whole store")
        count = 0
        for info in list(self.list(prefix)):
            if self.delete(info.key):
                count += 1
        return count

    # reads

    def stat(self, key: str) -> BlobInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise NotFound(f"object {key!r} not found", reason="NOT_FOUND") from None
        except OSError as exc:
            raise StorageError(f"cannot stat {key!r}: {exc}") from exc
        if not path.is_file():
            raise NotFound(f"object {key!r} not found", reason="NOT_FOUND")
        return BlobInfo(key, st.st_size, None, st.st_mtime)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        _check_range(offset, length)
        path = self._path(key)
        try:
            stream: BinaryIO = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"object {key!r} not found", reason="NOT_FOUND") from None
        except OSError as exc:
            raise StorageError(f"cannot open {key!r}: {exc}") from exc
        if offset:
            stream.seek(offset)
        return _ChunkStream(stream.read, stream.close, length)

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        """Sorted by key; only files MONAI Label would see as images are listed under images/."""
        found: list[BlobInfo] = []
        for directory, recursive in self._dirs_for(prefix):
            for path in self._walk(directory, recursive):
                key = self._key_for(path)
                if key is None or not key.startswith(prefix):
                    continue
                try:
                    st = path.stat()
                except OSError:
                    continue  # deleted while listing
                found.append(BlobInfo(key, st.st_size, None, st.st_mtime))
        found.sort(key=lambda info: info.key)
        return iter(found)

    def _dirs_for(self, prefix: str) -> list[tuple[Path, bool]]:
        areas = [("images/", self.root, False), ("labels/", self._labels, True), ("models/", self._models, True)]
        dirs: list[tuple[Path, bool]] = []
        for area, directory, recursive in areas:
            if area.startswith(prefix):
                dirs.append((directory, recursive))
            elif prefix.startswith(area):
                # Narrow the walk to the deepest folder the prefix names.
                sub = prefix[len(area) :].rsplit("/", 1)[0] if "/" in prefix[len(area) :] else ""
                parts = [p for p in sub.split("/") if p]
                if any(p in (".", "..") for p in parts):
                    return []
                dirs.append((directory.joinpath(*parts), recursive))
        return dirs

    @staticmethod
    def _walk(directory: Path, recursive: bool) -> Iterator[Path]:
        if not directory.is_dir():
            return
        if not recursive:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=True):
                        yield Path(entry.path)
            return
        for dirpath, dirnames, filenames in os.walk(directory):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                yield Path(dirpath) / name

    def presigned_get_url(self, key: str, expires_seconds: int) -> str:
        """A file:// URL: local files need no signature, and the path is what MONAI Label uses."""
        _check_expiry(expires_seconds)
        return self._path(key).absolute().as_uri()

    def spool_dir(self) -> Path:
        self._tmp.mkdir(parents=True, exist_ok=True)
        return self._tmp

    def close(self) -> None:
        """Nothing to release; here so both stores can be closed alike."""


# -- S3 --------------------------------------------------------------------------------


def _s3_sha256(metadata: Any) -> str | None:
    """SeaweedFS title-cases user metadata keys (X-Amz-Meta-Sha256): match case-insensitively."""
    if not metadata:
        return None
    for name, value in dict(metadata).items():
        lowered = str(name).lower()
        if lowered in ("x-amz-meta-sha256", "sha256"):
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            return str(value).lower() if value else None
    return None


def _mtime(value: Any) -> float:
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    return 0.0


def _split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """Accepts ``host:port`` (minio's form) and also ``http(s)://host:port``, as users write it."""
    if "://" not in endpoint:
        return endpoint, secure
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise StorageError(f"invalid S3 endpoint {endpoint!r}: expected host:port or http(s)://host:port")
    return parts.netloc, parts.scheme == "https"


def _part_size(size: int, minimum: int) -> int:
    """`minimum`, grown (in whole MiB) when a file would need more than S3's 10,000 parts."""
    part = max(minimum, -(-size // _S3_MAX_PARTS))
    return -(-part // (1024 * 1024)) * 1024 * 1024


class S3BlobStore:
    """Objects in an S3 bucket at ``<prefix><key>``, via the minio SDK.

    Uploads go through `fput_object` (multipart for big files, so an object appears only
    when complete; a failed multipart upload is aborted) with the sha256 as user metadata;
    reads are ranged GETs streamed in 1 MiB chunks. Every SDK or network failure surfaces
    as StorageError (a missing object as NotFound), never as a minio/urllib3 exception.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        prefix: str = "",
        secure: bool = False,
        region: str | None = None,
        create_bucket: bool = True,
        *,
        spool_root: Path | None = None,
        part_size: int = _S3_PART_SIZE,
        parallel_uploads: int = _S3_PARALLEL_UPLOADS,
        stale_spool_seconds: float = STALE_SPOOL_SECONDS,
    ):
        import urllib3
        from minio import Minio

        prefix = prefix.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if part_size < 5 * 1024 * 1024:
            raise InvalidArgument("S3 multipart parts must be at least 5 MiB")
        endpoint, secure = _split_endpoint(endpoint, secure)
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = endpoint
        self._part_size = part_size
        self._parallel = max(1, parallel_uploads)
        # Bounded retries and timeouts, so a dead endpoint fails in seconds (minio's default
        # retries for minutes); a pool big enough for the service's concurrent streams.
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=60.0),
            maxsize=32,
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        try:
            self._client = Minio(
                endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                region=region,
                http_client=self._http,
            )
        except Exception as exc:
            raise StorageError(f"invalid S3 endpoint {endpoint!r}: {exc}") from exc
        if spool_root is None:
            self._spool = Path(tempfile.mkdtemp(prefix="labelgrid-spool-"))
        else:
            self._spool = Path(spool_root)
            self._spool.mkdir(parents=True, exist_ok=True)
            _remove_stale(self._spool, stale_spool_seconds)
        self._ensure_bucket(create_bucket, region)

    def _ensure_bucket(self, create: bool, region: str | None) -> None:
        try:
            if self._client.bucket_exists(self.bucket):
                return
            if not create:
                raise StorageError(
                    f"S3 bucket {self.bucket!r} does not exist at {self.endpoint} (and creating it is off)"
                )
            try:
                self._client.make_bucket(self.bucket, location=region)
            except Exception as exc:
                if getattr(exc, "code", "") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        except StorageError:
            raise
        except Exception as exc:
            raise self._error(f"cannot open S3 bucket {self.bucket!r}", exc) from exc

    def close(self) -> None:
        """Drops pooled connections (the store is unusable afterwards)."""
        self._http.clear()

    # helpers

    def _name(self, key: str) -> str:
        _split_key(key)
        return self.prefix + key

    @staticmethod
    def _is_not_found(exc: BaseException) -> bool:
        code = getattr(exc, "code", None)
        if code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound", "NotFound"):
            return True
        response = getattr(exc, "response", None)
        return getattr(response, "status", None) == 404 and code != "NoSuchBucket"

    def _error(self, what: str, exc: BaseException) -> StorageError:
        code = getattr(exc, "code", None)
        detail = f"{code}: {getattr(exc, 'message', exc)}" if code else f"{type(exc).__name__}: {exc}"
        return StorageError(f"{what} (S3 {self.endpoint}/{self.bucket}): {detail}")

    # writes

    def put_file(self, key: str, path: Path, *, sha256: str, content_type: str = "application/octet-stream") -> None:
        """Uploads `path` (multipart when big: invisible until complete, aborted on failure); consumes `path`."""
        source = Path(path)
        try:
            name = self._name(key)
            digest = _check_sha256(sha256)
            try:
                size = source.stat().st_size
            except OSError as exc:
                raise StorageError(f"cannot store {key!r}: the source file is unreadable: {exc}") from exc
            if not source.is_file():
                raise StorageError(f"cannot store {key!r}: the source {source} is not a file")
            try:
                self._client.fput_object(
                    self.bucket,
                    name,
                    str(source),
                    content_type=content_type,
                    metadata={"sha256": digest},
                    part_size=_part_size(size, self._part_size),
                    num_parallel_uploads=self._parallel,
                )
            except Exception as exc:
                raise self._error(f"cannot store {key!r}", exc) from exc
        finally:
            _discard(source)

    def delete(self, key: str) -> bool:
        """True if the object existed (S3's DELETE cannot tell: a HEAD first)."""
        name = self._name(key)
        if not self.exists(key):
            return False
        try:
            self._client.remove_object(self.bucket, name)
        except Exception as exc:
            if self._is_not_found(exc):
                return False
            raise self._error(f"cannot delete {key!r}", exc) from exc
        return True

    def delete_prefix(self, prefix: str) -> int:
        """Deletes every object under `prefix` (batches of 1,000); an empty prefix is refused."""
        from minio.deleteobjects import DeleteObject

        if not prefix:
            raise InvalidArgument("delete_prefix needs a prefix: refusing to delete the whole store")
        names = [self.prefix + info.key for info in self._list(prefix, only_keys=False)]
        for start in range(0, len(names), 1000):
            batch = [DeleteObject(n) for n in names[start : start + 1000]]
            try:
                errors = list(self._client.remove_objects(self.bucket, batch))
            except Exception as exc:
                raise self._error(f"cannot delete objects under {prefix!r}", exc) from exc
            failed = [e for e in errors if getattr(e, "code", None) not in ("NoSuchKey", None)]
            if failed:
                raise StorageError(
                    f"cannot delete {len(failed)} objects under {prefix!r}: {failed[0].code}: {failed[0].message}"
                )
        return len(names)

    # reads

    def stat(self, key: str) -> BlobInfo:
        """Size, mtime and the sha256 stored with the object at upload (None if it came from elsewhere)."""
        name = self._name(key)
        try:
            obj = self._client.stat_object(self.bucket, name)
        except Exception as exc:
            if self._is_not_found(exc):
                raise NotFound(f"object {key!r} not found", reason="NOT_FOUND") from None
            raise self._error(f"cannot stat {key!r}", exc) from exc
        return BlobInfo(key, int(obj.size or 0), _s3_sha256(obj.metadata), _mtime(obj.last_modified))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except NotFound:
            return False
        return True

    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        _check_range(offset, length)
        name = self._name(key)
        if length == 0:
            # minio reads length=0 as "to the end"; an empty read still has to prove the object exists.
            self.stat(key)
            return iter(())
        try:
            response = self._client.get_object(self.bucket, name, offset=offset, length=length or 0)
        except Exception as exc:
            if self._is_not_found(exc):
                raise NotFound(f"object {key!r} not found", reason="NOT_FOUND") from None
            if getattr(exc, "code", None) == "InvalidRange":
                return iter(())  # offset at or past the end: nothing to read, like a file
            raise self._error(f"cannot read {key!r}", exc) from exc

        def read(amount: int) -> bytes:
            # Raw bytes: never let urllib3 gunzip a .nii.gz a server labels Content-Encoding: gzip.
            return response.read(amount, decode_content=False)

        def release() -> None:
            try:
                response.close()
            finally:
                response.release_conn()

        return _ChunkStream(read, release, length)

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        """Valid keys under `prefix`, sorted (SeaweedFS lists folder by folder, not in S3's byte order).

        One listing, no HEAD per object: `sha256` is None here; `stat` reads it.
        """
        return iter(self._list(prefix, only_keys=True))

    def _list(self, prefix: str, *, only_keys: bool) -> list[BlobInfo]:
        found: list[BlobInfo] = []
        try:
            for obj in self._client.list_objects(self.bucket, prefix=self.prefix + prefix, recursive=True):
                name = obj.object_name or ""
                if obj.is_dir or name.endswith("/") or not name.startswith(self.prefix):
                    continue
                key = name[len(self.prefix) :]
                if only_keys and not self._valid_key(key):
                    continue  # e.g. a file someone put into the bucket by hand under a name we never use
                found.append(BlobInfo(key, int(obj.size or 0), None, _mtime(obj.last_modified)))
        except Exception as exc:
            raise self._error(f"cannot list objects under {prefix!r}", exc) from exc
        found.sort(key=lambda info: info.key)
        return found

    @staticmethod
    def _valid_key(key: str) -> bool:
        try:
            _split_key(key)
        except InvalidArgument:
            return False
        return True

    def presigned_get_url(self, key: str, expires_seconds: int) -> str:
        """A SigV4 GET URL for the endpoint as configured (clients must reach that address)."""
        name = self._name(key)
        _check_expiry(expires_seconds)
        try:
            return self._client.presigned_get_object(
                self.bucket, name, expires=_dt.timedelta(seconds=expires_seconds)
            )
        except Exception as exc:
            raise self._error(f"cannot sign a URL for {key!r}", exc) from exc

    def spool_dir(self) -> Path:
        self._spool.mkdir(parents=True, exist_ok=True)
        return self._spool


__all__ = ["CHUNK_SIZE", "MONAILABEL_IMAGE_EXTS", "BlobInfo", "BlobStore", "LocalBlobStore", "S3BlobStore"]
