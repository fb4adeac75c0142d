"""The S3 blob store (minio SDK): objects in a bucket, for clusters."""

from __future__ import annotations

import builtins
import datetime as _dt
import logging
import queue
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from services.common.downloads import content_disposition
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, StorageError
from services.datastore.adapters.blobs.shared import (
    CHUNK_SIZE,
    STALE_SPOOL_SECONDS,
    _check_expiry,
    _check_range,
    _check_sha256,
    _ChunkStream,
    _discard,
    _remove_stale,
    _split_key,
)
from services.datastore.domain.ports import BlobInfo

_S3_PART_SIZE = 16 * 1024 * 1024
_S3_MAX_PARTS = 10_000
_S3_PARALLEL_UPLOADS = 2
_READ_AHEAD_CHUNKS = 8
"""Chunks (1 MiB) a download reads ahead of its consumer (see _ReadAhead)."""
_END = object()
_COPY_LIMIT = 5 * 1024**3
"""Largest object one CopyObject can copy (the sha256 metadata of a streamed upload is set by one)."""

log = logging.getLogger(__name__)


class _ReadAhead(Iterator[bytes]):
    """An object's chunks read by a thread of their own, up to _READ_AHEAD_CHUNKS ahead of the
    consumer: the S3 read of the next chunks overlaps the sending of this one. Reading one
    chunk per thread hop, as the consumer asks, made each S3 read and each send wait for the
    other (REST downloads at ~1/3 of the raw SDK's rate). Closing it (or dropping it) stops the
    thread, which releases the connection."""

    def __init__(self, source: _ChunkStream) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=_READ_AHEAD_CHUNKS)
        self._stop = threading.Event()
        self._done = False
        self._failed: BaseException | None = None
        # The thread holds the source, the queue and the flag, never this object: dropping it
        # runs __del__, which stops the thread.
        threading.Thread(
            target=_read_ahead, args=(source, self._queue, self._stop), name="s3-read-ahead", daemon=True
        ).start()

    def __iter__(self) -> _ReadAhead:
        return self

    def __next__(self) -> bytes:
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, bytes):
            return item
        self._done = True
        if isinstance(item, BaseException):
            raise item
        raise StopIteration  # _END

    def take(self, limit: int) -> list[bytes]:
        """The chunks read so far, up to about `limit` bytes, waiting only for the first; []
        at the end. send_chunks sends them on after one thread hop, not one per chunk."""
        batch: list[bytes] = []
        size = 0
        while not self._done and size < limit:
            try:
                item = self._queue.get() if not batch else self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, bytes):
                batch.append(item)
                size += len(item)
                continue
            self._done = True
            if isinstance(item, BaseException):
                self._failed = item  # raised below if nothing was read, else by the next call
        if not batch and self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        return batch

    def close(self) -> None:
        self._done = True
        self._stop.set()

    def __del__(self) -> None:
        self._stop.set()


def _read_ahead(source: _ChunkStream, chunks: queue.Queue[Any], stop: threading.Event) -> None:
    """_ReadAhead's thread: the chunks, then _END or the error, until told to stop."""

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for chunk in source:
            if not offer(chunk):
                return
        offer(_END)
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
        offer(exc)
    finally:
        source.close()


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


def _read_into(path: Path, offset: int, view: memoryview) -> int:
    """Reads `path` from `offset` into `view` until it is full or the file ends; the bytes read."""
    filled = 0
    with path.open("rb", buffering=0) as source:
        source.seek(offset)
        while filled < len(view):
            count = source.readinto(view[filled:])
            if not count:
                break
            filled += count
    return filled


def _part_size(size: int, minimum: int) -> int:
    """`minimum`, grown (in whole MiB) when a file would need more than S3's 10,000 parts."""
    part = max(minimum, -(-size // _S3_MAX_PARTS))
    return -(-part // (1024 * 1024)) * 1024 * 1024


class StreamedPut:
    """A multipart upload fed from a spool file while the upload is still arriving.

    The writer of the spool calls `advance(size)` after each write (the file flushed): every
    full part from the spool is uploaded by the store's threads, at most `parallel` at once
    per upload (`advance` waits for room, which slows the sender: memory stays at most
    `parallel` parts). The multipart upload is created with the first full part, so a file
    smaller than one part is simply put at the end. `put_file` on the same spool path
    completes it (the rest of the file as the last part); `abort` (any failure, the format
    check refusing the file, the client hanging up) aborts it. Until completed the object is
    invisible: readers never see a half-written file. S3 metadata is fixed when a multipart
    upload starts, before the sha256 is known, so completing sets it with one CopyObject of the
    object onto itself (metadata only; an object over 5 GiB keeps none, reindex then hashes it).
    """

    def __init__(self, store: S3BlobStore, key: str, path: Path, part_size: int) -> None:
        self.key, self.path = key, Path(path)
        self._store, self._name, self._part_size = store, store._name(key), part_size
        self._upload_id: str | None = None
        self._parts: list[Future[Any]] = []
        self._room = threading.BoundedSemaphore(store._parallel)
        # One part buffer per slot, reused: a fresh 16 MiB bytes per part leaves freed parts
        # resident in malloc's arenas (RSS grew by up to 3 parts more than were in flight).
        self._buffers: list[bytearray] = []
        self._buffers_lock = threading.Lock()
        self._submitted = 0
        self._closed = False
        self._lock = threading.Lock()

    def wants(self, size: int) -> bool:
        """True when `size` bytes on disk hold a part not yet sent."""
        return size - self._submitted >= self._part_size

    def advance(self, size: int) -> None:
        """Sends every full part of the first `size` bytes of the spool (already on disk)."""
        while self.wants(size):
            self._raise_failed()
            self._room.acquire()
            try:
                with self._lock:
                    if self._closed:
                        raise StorageError(f"the upload of {self.key!r} was aborted")
                    if self._upload_id is None:
                        self._upload_id = self._store._client._create_multipart_upload(
                            self._store.bucket, self._name, {"Content-Type": "application/octet-stream"}
                        )
                    number, offset = len(self._parts) + 1, self._submitted
                    self._parts.append(self._store._pool.submit(self._send, number, offset, self._part_size))
                    self._submitted += self._part_size
            except BaseException as exc:
                self._room.release()
                if isinstance(exc, StorageError):
                    raise
                raise self._store._error(f"cannot store {self.key!r}", exc) from exc

    def _send(self, number: int, offset: int, length: int) -> Any:
        """Sends one part (the caller holds a slot of `_room`, released here)."""
        from minio.datatypes import Part

        try:
            with self._buffers_lock:
                buffer = self._buffers.pop() if self._buffers else bytearray(self._part_size)
            try:
                data = memoryview(buffer)[: _read_into(self.path, offset, memoryview(buffer)[:length])]
                assert self._upload_id is not None
                # The SDK hashes and sends any bytes-like body (hashlib, urllib3), not just bytes.
                body = cast(bytes, data)
                etag = self._store._client._upload_part(
                    self._store.bucket, self._name, body, None, self._upload_id, number
                )
            finally:
                with self._buffers_lock:
                    self._buffers.append(buffer)
            return Part(number, etag)
        finally:
            self._room.release()

    def _raise_failed(self) -> None:
        for part in self._parts:
            if part.done() and part.exception() is not None:
                exc = part.exception()
                assert exc is not None
                raise self._store._error(f"cannot store {self.key!r}", exc) from exc

    def complete(self, size: int, sha256: str, content_type: str) -> bool:
        """Sends the rest and completes the object; False when nothing was sent yet (then the
        caller puts the file as usual). Aborts the upload when anything fails."""
        if self._upload_id is None:
            self.abort()
            return False
        from minio.commonconfig import REPLACE, CopySource

        try:
            self.advance(size)
            parts = [part.result() for part in self._parts]
            if size > self._submitted:
                parts.append(self._send_last(len(parts) + 1, size))
            with self._lock:
                if self._closed:
                    raise StorageError(f"the upload of {self.key!r} was aborted")
                self._closed = True
            client = self._store._client
            client._complete_multipart_upload(self._store.bucket, self._name, self._upload_id, parts)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, StorageError):
                raise
            raise self._store._error(f"cannot store {self.key!r}", exc) from exc
        if size <= _COPY_LIMIT:
            try:
                client.copy_object(
                    self._store.bucket,
                    self._name,
                    CopySource(self._store.bucket, self._name),
                    metadata={"sha256": sha256, "Content-Type": content_type},
                    metadata_directive=REPLACE,
                )
            except Exception as exc:  # noqa: BLE001 - the object is complete; only the hint is missing
                log.warning("no sha256 metadata on %s: %s", self.key, exc)
        return True

    def _send_last(self, number: int, size: int) -> Any:
        self._room.acquire()
        return self._send(number, self._submitted, size - self._submitted)

    def abort(self) -> None:
        """Stops the upload: no more parts; the multipart upload (if any) is aborted once the
        parts in flight are done. Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._store._forget(self)
        if self._upload_id is None:
            return
        upload_id, parts = self._upload_id, list(self._parts)

        def abort() -> None:
            for part in parts:
                try:
                    part.result()
                except BaseException:  # noqa: BLE001 - aborting anyway
                    pass
            try:
                self._store._client._abort_multipart_upload(self._store.bucket, self._name, upload_id)
            except Exception as exc:  # noqa: BLE001 - an unfinished upload is invisible; a lifecycle rule removes it
                log.warning("cannot abort the multipart upload of %s: %s", self.key, exc)

        # A thread of its own: it waits for parts that may still queue in the pool.
        threading.Thread(target=abort, name="s3-abort", daemon=True).start()


class S3BlobStore:
    """Objects in an S3 bucket at ``<prefix><key>``, via the minio SDK.

    Uploads go through `fput_object` (multipart for big files, so an object appears only
    when complete; a failed multipart upload is aborted) with the sha256 as user metadata,
    or, for a spool registered with `streamed_put`, as a multipart upload sent while the
    spool is still being written (StreamedPut), completed by `put_file`;
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
        public_endpoint: str = "",
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
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="s3-part")
        self._streamed: dict[Path, StreamedPut] = {}
        self._streamed_lock = threading.Lock()
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
        self._public: Any = None
        if public_endpoint:
            public, public_secure = _split_endpoint(public_endpoint, secure)
            try:
                # Only signs (client_get_url), never connects: its region is the bucket's as
                # the internal endpoint answers it (asked at the first signature), else it would
                # ask the public address, which this service may not reach.
                self._public = Minio(public, access_key=access_key, secret_key=secret_key, secure=public_secure)
            except Exception as exc:
                raise StorageError(f"invalid S3 public endpoint {public_endpoint!r}: {exc}") from exc
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
        self._pool.shutdown(wait=True)
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

    can_stream_puts = True
    """`streamed_put` is offered (see domain.streaming)."""

    def streamed_put(self, key: str, path: Path, expected_size: int) -> StreamedPut:
        """Starts sending the spool at `path` (to be stored under `key`) while it is written;
        `put_file(key, path, ...)` completes it, `abort()` drops it (see StreamedPut)."""
        self._name(key)
        put = StreamedPut(self, key, Path(path), _part_size(expected_size, self._part_size))
        with self._streamed_lock:
            # A spool handed over but never stored (its caller cancelled in between) is gone
            # from disk: its upload is aborted here.
            stale = [p for p in self._streamed.values() if not p.path.exists()]
            self._streamed[put.path] = put
        for old in stale:
            old.abort()
        return put

    def _forget(self, put: StreamedPut) -> None:
        with self._streamed_lock:
            if self._streamed.get(put.path) is put:
                del self._streamed[put.path]

    def release_streamed(self, path: Path) -> None:
        """Aborts the streamed upload of the spool at `path` unless `put_file` stored it."""
        with self._streamed_lock:
            put = self._streamed.get(Path(path))
        if put is not None:
            put.abort()

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
            with self._streamed_lock:
                streamed = self._streamed.pop(source, None)
            if streamed is not None:
                if streamed.key == key and streamed.complete(size, digest, content_type):
                    return
                streamed.abort()
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

    def copy(self, source_key: str, target_key: str) -> None:
        """A server-side copy (no bytes through this process), sha256 metadata included."""
        from minio.commonconfig import REPLACE, CopySource

        source = self.stat(source_key)  # NotFound without one
        metadata: Any = {"sha256": source.sha256} if source.sha256 else None
        try:
            self._client.copy_object(
                self.bucket,
                self._name(target_key),
                CopySource(self.bucket, self._name(source_key)),
                metadata=metadata,
                metadata_directive=REPLACE if metadata else None,
            )
        except Exception as exc:
            if self._is_not_found(exc):
                raise NotFound(f"object {source_key!r} not found", reason="NOT_FOUND") from None
            raise self._error(f"cannot copy {source_key!r} to {target_key!r}", exc) from exc

    def move(self, source_key: str, target_key: str) -> None:
        """A server-side copy, then the source is deleted (S3 has no rename)."""
        self.copy(source_key, target_key)
        self.delete(source_key)

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

        stream = _ChunkStream(read, release, length)
        return stream if length is not None and length <= CHUNK_SIZE else _ReadAhead(stream)

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        """Valid keys under `prefix`, sorted (SeaweedFS lists folder by folder, not in S3's byte order).

        One listing, no HEAD per object: `sha256` is None here; `stat` reads it.
        """
        return iter(self._list(prefix, only_keys=True))

    def _list(self, prefix: str, *, only_keys: bool) -> builtins.list[BlobInfo]:
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
            return self._client.presigned_get_object(self.bucket, name, expires=_dt.timedelta(seconds=expires_seconds))
        except Exception as exc:
            raise self._error(f"cannot sign a URL for {key!r}", exc) from exc

    @property
    def client_urls(self) -> bool:
        """Whether client_get_url can sign: a public endpoint was configured."""
        return self._public is not None

    @property
    def edge_urls(self) -> bool:
        """Whether client_get_url(public=False) can sign: always, on the endpoint this service uses."""
        return True

    def client_get_url(
        self, key: str, expires_seconds: int, file_name: str, content_type: str, *, public: bool = True
    ) -> str:
        """A SigV4 GET URL that makes S3 answer with `file_name` as an attachment and
        `content_type`, as a download through the gateway has them. `public`: on the public
        endpoint (the address clients outside the cluster reach the same store at); else on the
        endpoint this service uses (for the edge proxy, which reaches S3 where this service does)."""
        signer = self._public if public else self._client
        if signer is None:
            raise FailedPrecondition("no S3 public endpoint is configured: downloads cannot be handed to S3")
        name = self._name(key)
        _check_expiry(expires_seconds)
        headers: dict[str, str | list[str] | tuple[str]] = {
            "response-content-disposition": content_disposition(file_name),
            "response-content-type": content_type,
        }
        try:
            if self.bucket not in signer._region_map:
                signer._region_map[self.bucket] = self._client._get_region(self.bucket)
            return str(
                signer.presigned_get_object(
                    self.bucket, name, expires=_dt.timedelta(seconds=expires_seconds), response_headers=headers
                )
            )
        except Exception as exc:
            raise self._error(f"cannot sign a URL for {key!r}", exc) from exc

    def spool_dir(self) -> Path:
        self._spool.mkdir(parents=True, exist_ok=True)
        return self._spool
