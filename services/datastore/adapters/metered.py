"""The datastore's two ports, metered: `MeteredBlobStore` implements `BlobStore` and
`MeteredIndex` implements `Index`, each method written out (no `__getattr__`), so a port
method that is added or renamed without its metered twin fails mypy (``instrument`` assigns
them to the ports' types) and tests/unit/test_datastore_metrics.py.

Counted: bytes put into and read from the object store by kind (the key's area), and calls
that failed in the store (``blobs.<method>`` / ``index.<method>``; client errors such as
NOT_FOUND are not the store's fault and are not counted).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from services.common.paging import DEFAULT_PAGE_SIZE
from services.common.streams import take_chunks
from services.datastore.domain.model import (
    DEFAULT_TAG_FINAL,
    DatastoreStatus,
    ImageFilter,
    ImageImport,
    ImageOrder,
    ImageRecord,
    LabelImport,
    LabelRecord,
    LeaseRecord,
    ModelRecord,
    ModelVersionRecord,
    Page,
    Record,
    SessionRecord,
)
from services.datastore.domain.ports import BlobInfo, BlobStore, BulkImportResult, Index, NoLeaseReason, Now

if TYPE_CHECKING:
    from services.datastore.adapters.metrics import DatastoreMetrics

# The blob key's first part -> the `kind` label of the byte counters.
KINDS = {"images": "images", "labels": "labels", "models": "model_versions", "sessions": "sessions"}


class _CountingChunks:
    """A download's chunk iterator that counts the bytes it yields (and keeps close())."""

    def __init__(self, chunks: Iterator[bytes], counter: Any, on_error: Callable[[BaseException], None]) -> None:
        self._chunks, self._counter, self._on_error = chunks, counter, on_error

    def __iter__(self) -> _CountingChunks:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            raise
        except Exception as error:
            self._on_error(error)
            raise
        self._counter.inc(len(chunk))
        return chunk

    def take(self, limit: int) -> list[bytes]:
        """send_chunks' batch of chunks (the inner read-ahead's, when it has one), counted."""
        try:
            batch = take_chunks(self._chunks, limit)
        except Exception as error:
            self._on_error(error)
            raise
        self._counter.inc(sum(map(len, batch)))
        return batch

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


_T = TypeVar("_T")


class _Meter:
    """Runs one port call; counts its failure under ``<port>.<method>``."""

    def __init__(self, port: str, metrics: DatastoreMetrics) -> None:
        self._port = port
        self.metrics = metrics

    def __call__(self, operation: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            self.metrics.store_failed(f"{self._port}.{operation}", error)
            raise


def _kind(key: str) -> str:
    return KINDS.get(key.split("/", 1)[0], "other")


class MeteredBlobStore:
    """The ``BlobStore`` port, counting bytes in and out by kind and failed calls."""

    def __init__(self, blobs: BlobStore, metrics: DatastoreMetrics) -> None:
        self.inner = blobs
        self._call = _Meter("blobs", metrics)

    def put_file(self, key: str, path: Path, *, sha256: str, content_type: str = "application/octet-stream") -> None:
        try:
            size = os.stat(path).st_size  # before: put_file consumes the file
        except OSError:
            size = 0
        self._call("put_file", self.inner.put_file, key, path, sha256=sha256, content_type=content_type)
        self._call.metrics.bytes_received.labels(_kind(key)).inc(size)

    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        chunks = self._call("open_read", self.inner.open_read, key, offset, length)
        metrics = self._call.metrics
        return _CountingChunks(
            chunks, metrics.bytes_sent.labels(_kind(key)), lambda e: metrics.store_failed("blobs.open_read", e)
        )

    def stat(self, key: str) -> BlobInfo:
        return self._call("stat", self.inner.stat, key)

    def exists(self, key: str) -> bool:
        return self._call("exists", self.inner.exists, key)

    def copy(self, source_key: str, target_key: str) -> None:
        self._call("copy", self.inner.copy, source_key, target_key)

    def move(self, source_key: str, target_key: str) -> None:
        self._call("move", self.inner.move, source_key, target_key)

    def delete(self, key: str) -> bool:
        return self._call("delete", self.inner.delete, key)

    def delete_prefix(self, prefix: str) -> int:
        return self._call("delete_prefix", self.inner.delete_prefix, prefix)

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        # Listings are lazy on some stores: meter the iteration too.
        items = self._call("list", self.inner.list, prefix)
        return _MeteredIter(items, lambda e: self._call.metrics.store_failed("blobs.list", e))

    def presigned_get_url(self, key: str, expires_seconds: int) -> str:
        return self._call("presigned_get_url", self.inner.presigned_get_url, key, expires_seconds)

    def spool_dir(self) -> Path:
        return self._call("spool_dir", self.inner.spool_dir)

    # Not part of the port: what a store that sends spools while they are written offers
    # (S3BlobStore; see domain.streaming). The bytes are counted by put_file, which stores them.

    @property
    def can_stream_puts(self) -> bool:
        return bool(getattr(self.inner, "can_stream_puts", False))

    @property
    def spools_become_blobs(self) -> bool:
        """The local store's: its spools are written back while they arrive (Datastore.new_spool)."""
        return bool(getattr(self.inner, "spools_become_blobs", False))

    def streamed_put(self, key: str, path: Path, expected_size: int) -> Any:
        return self._call("streamed_put", self.inner.streamed_put, key, path, expected_size)  # type: ignore[attr-defined]

    def release_streamed(self, path: Path) -> None:
        release = getattr(self.inner, "release_streamed", None)
        if release is not None:
            self._call("release_streamed", release, path)

    # Not part of the port either: URLs for clients outside the cluster and for the edge proxy
    # (S3BlobStore; see Datastore.download_url).

    @property
    def client_urls(self) -> bool:
        return bool(getattr(self.inner, "client_urls", False))

    @property
    def edge_urls(self) -> bool:
        return bool(getattr(self.inner, "edge_urls", False))

    def client_get_url(
        self, key: str, expires_seconds: int, file_name: str, content_type: str, *, public: bool = True
    ) -> str:
        sign = self.inner.client_get_url  # type: ignore[attr-defined]
        return self._call("client_get_url", sign, key, expires_seconds, file_name, content_type, public=public)


class _MeteredIter(Iterator[BlobInfo]):
    def __init__(self, items: Iterator[BlobInfo], on_error: Callable[[BaseException], None]) -> None:
        self._items, self._on_error = iter(items), on_error

    def __next__(self) -> BlobInfo:
        try:
            return next(self._items)
        except StopIteration:
            raise
        except Exception as error:
            self._on_error(error)
            raise


class MeteredIndex:
    """The ``Index`` port, counting failed calls (``index.<method>``)."""

    def __init__(self, index: Index, metrics: DatastoreMetrics) -> None:
        self.inner = index
        self._call = _Meter("index", metrics)

    @property
    def backend(self) -> str:
        return self.inner.backend

    # -- images and labels

    def upsert_image(
        self,
        image_id: str,
        ext: str,
        sha256: str,
        size: int,
        info: Mapping[str, Any] | None = None,
        *,
        fail_if_exists: bool = False,
        now: Now = None,
    ) -> ImageRecord:
        return self._call(
            "upsert_image", self.inner.upsert_image, image_id, ext, sha256, size, info,
            fail_if_exists=fail_if_exists, now=now,
        )  # fmt: skip

    def get_image(self, image_id: str) -> ImageRecord:
        return self._call("get_image", self.inner.get_image, image_id)

    def delete_image(self, image_id: str) -> ImageRecord:
        return self._call("delete_image", self.inner.delete_image, image_id)

    def update_image_info(
        self,
        image_id: str,
        info: Mapping[str, Any],
        *,
        replace: bool = False,
        expected_revision: int | None = None,
        now: Now = None,
    ) -> ImageRecord:
        return self._call(
            "update_image_info", self.inner.update_image_info, image_id, info,
            replace=replace, expected_revision=expected_revision, now=now,
        )  # fmt: skip

    def upsert_label(
        self,
        image_id: str,
        tag: str,
        ext: str,
        sha256: str,
        size: int,
        info: Mapping[str, Any] | None = None,
        *,
        now: Now = None,
    ) -> LabelRecord:
        return self._call("upsert_label", self.inner.upsert_label, image_id, tag, ext, sha256, size, info, now=now)

    def get_label(self, image_id: str, tag: str) -> LabelRecord:
        return self._call("get_label", self.inner.get_label, image_id, tag)

    def find_label(self, image_id: str, tag: str) -> LabelRecord | None:
        return self._call("find_label", self.inner.find_label, image_id, tag)

    def delete_label(self, image_id: str, tag: str) -> LabelRecord:
        return self._call("delete_label", self.inner.delete_label, image_id, tag)

    def update_label_info(
        self,
        image_id: str,
        tag: str,
        info: Mapping[str, Any],
        *,
        replace: bool = False,
        expected_revision: int | None = None,
        now: Now = None,
    ) -> LabelRecord:
        return self._call(
            "update_label_info", self.inner.update_label_info, image_id, tag, info,
            replace=replace, expected_revision=expected_revision, now=now,
        )  # fmt: skip

    def set_score(
        self,
        image_id: str,
        key: str,
        value: float,
        model_version: str = "",
        *,
        info: Mapping[str, Any] | None = None,
        now: Now = None,
    ) -> None:
        self._call("set_score", self.inner.set_score, image_id, key, value, model_version, info=info, now=now)

    # -- listing and counts

    def list_images(
        self,
        *,
        filter: ImageFilter = ImageFilter.ALL,
        tag: str = DEFAULT_TAG_FINAL,
        order: ImageOrder = ImageOrder.ID,
        score_key: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        exclude_leased: bool = False,
        now: Now = None,
    ) -> Page[ImageRecord]:
        return self._call(
            "list_images", self.inner.list_images, filter=filter, tag=tag, order=order, score_key=score_key,
            page_size=page_size, page_token=page_token, exclude_leased=exclude_leased, now=now,
        )  # fmt: skip

    def status(self, *, hidden_id_prefix: str = "", hidden_info_key: str = "") -> DatastoreStatus:
        return self._call(
            "status", self.inner.status, hidden_id_prefix=hidden_id_prefix, hidden_info_key=hidden_info_key
        )

    def status_if_cached(self, *, hidden_id_prefix: str = "", hidden_info_key: str = "") -> DatastoreStatus | None:
        return self._call(
            "status_if_cached",
            self.inner.status_if_cached,
            hidden_id_prefix=hidden_id_prefix,
            hidden_info_key=hidden_info_key,
        )

    # -- leases

    def acquire_next_lease(
        self,
        client_id: str,
        strategy: str,
        *,
        order: ImageOrder = ImageOrder.ID,
        score_key: str | None = None,
        tag: str = DEFAULT_TAG_FINAL,
        ttl_seconds: float,
        now: Now = None,
        mark_in_info: bool = False,
    ) -> tuple[ImageRecord, LeaseRecord] | None:
        return self._call(
            "acquire_next_lease", self.inner.acquire_next_lease, client_id, strategy, order=order,
            score_key=score_key, tag=tag, ttl_seconds=ttl_seconds, now=now, mark_in_info=mark_in_info,
        )  # fmt: skip

    def no_lease_reason(self, tag: str = DEFAULT_TAG_FINAL, *, now: Now = None) -> NoLeaseReason:
        return self._call("no_lease_reason", self.inner.no_lease_reason, tag, now=now)

    def renew_lease(self, image_id: str, client_id: str, ttl_seconds: float, *, now: Now = None) -> LeaseRecord:
        return self._call("renew_lease", self.inner.renew_lease, image_id, client_id, ttl_seconds, now=now)

    def release_lease(self, image_id: str, client_id: str, *, now: Now = None) -> None:
        self._call("release_lease", self.inner.release_lease, image_id, client_id, now=now)

    def list_leases(
        self,
        client_id: str | None = None,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        now: Now = None,
    ) -> Page[LeaseRecord]:
        return self._call(
            "list_leases", self.inner.list_leases, client_id, page_size=page_size, page_token=page_token, now=now
        )

    def expire_leases(self, now: Now = None) -> int:
        return self._call("expire_leases", self.inner.expire_leases, now)

    # -- models

    def add_model_version(
        self,
        name: str,
        version: str | None,
        file_name: str,
        sha256: str,
        size: int,
        metrics: Mapping[str, Any] | None = None,
        info: Mapping[str, Any] | None = None,
        *,
        now: Now = None,
    ) -> ModelVersionRecord:
        return self._call(
            "add_model_version", self.inner.add_model_version, name, version, file_name, sha256, size, metrics, info,
            now=now,
        )  # fmt: skip

    def get_model(self, name: str) -> ModelRecord:
        return self._call("get_model", self.inner.get_model, name)

    def list_models(self, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "") -> Page[ModelRecord]:
        return self._call("list_models", self.inner.list_models, page_size, page_token)

    def list_model_versions(
        self, name: str, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> Page[ModelVersionRecord]:
        return self._call("list_model_versions", self.inner.list_model_versions, name, page_size, page_token)

    def get_model_version(self, name: str, version: str) -> ModelVersionRecord:
        return self._call("get_model_version", self.inner.get_model_version, name, version)

    def delete_model_version(self, name: str, version: str) -> ModelVersionRecord:
        return self._call("delete_model_version", self.inner.delete_model_version, name, version)

    def pin_model_version(self, name: str, version: str | None) -> ModelRecord:
        return self._call("pin_model_version", self.inner.pin_model_version, name, version)

    # -- sessions

    def create_session(
        self,
        session_id: str,
        *,
        owner: str,
        file_name: str,
        ext: str,
        sha256: str,
        size: int,
        meta: Mapping[str, Any],
        expiry_seconds: int,
        per_owner: int,
        total: int,
        now: Now = None,
    ) -> SessionRecord:
        return self._call(
            "create_session",
            self.inner.create_session,
            session_id,
            owner=owner,
            file_name=file_name,
            ext=ext,
            sha256=sha256,
            size=size,
            meta=meta,
            expiry_seconds=expiry_seconds,
            per_owner=per_owner,
            total=total,
            now=now,
        )

    def get_session(self, session_id: str, *, now: Now = None) -> SessionRecord:
        return self._call("get_session", self.inner.get_session, session_id, now=now)

    def touch_session(self, session_id: str, *, now: Now = None) -> SessionRecord:
        return self._call("touch_session", self.inner.touch_session, session_id, now=now)

    def delete_session(self, session_id: str, *, now: Now = None) -> SessionRecord:
        return self._call("delete_session", self.inner.delete_session, session_id, now=now)

    def expired_sessions(self, *, now: Now = None, limit: int = 1000) -> list[SessionRecord]:
        return self._call("expired_sessions", self.inner.expired_sessions, now=now, limit=limit)

    def remove_expired_session(self, session_id: str, *, now: Now = None) -> bool:
        return self._call("remove_expired_session", self.inner.remove_expired_session, session_id, now=now)

    def session_ids(self) -> set[str]:
        return self._call("session_ids", self.inner.session_ids)

    # -- records

    def put_record(
        self,
        kind: str,
        record_id: str,
        data: Mapping[str, Any],
        expected_revision: int | None = None,
        *,
        now: Now = None,
    ) -> Record:
        return self._call("put_record", self.inner.put_record, kind, record_id, data, expected_revision, now=now)

    def get_record(self, kind: str, record_id: str) -> Record:
        return self._call("get_record", self.inner.get_record, kind, record_id)

    def list_records(self, kind: str, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "") -> Page[Record]:
        return self._call("list_records", self.inner.list_records, kind, page_size, page_token)

    def delete_record(self, kind: str, record_id: str, expected_revision: int | None = None) -> Record:
        return self._call("delete_record", self.inner.delete_record, kind, record_id, expected_revision)

    # -- MONAI Label's datastore model, reindex

    def export_monailabel_model(self, name: str = "new-dataset", description: str = "New Dataset") -> dict[str, Any]:
        return self._call("export_monailabel_model", self.inner.export_monailabel_model, name, description)

    def export_monailabel_json(
        self,
        name: str = "new-dataset",
        description: str = "New Dataset",
        *,
        hidden_id_prefix: str = "",
        hidden_info_key: str = "",
    ) -> bytes:
        return self._call(
            "export_monailabel_json", self.inner.export_monailabel_json, name, description,
            hidden_id_prefix=hidden_id_prefix, hidden_info_key=hidden_info_key,
        )  # fmt: skip

    def export_monailabel_json_if_cached(
        self,
        name: str = "new-dataset",
        description: str = "New Dataset",
        *,
        hidden_id_prefix: str = "",
        hidden_info_key: str = "",
    ) -> bytes | None:
        return self._call(
            "export_monailabel_json_if_cached", self.inner.export_monailabel_json_if_cached, name, description,
            hidden_id_prefix=hidden_id_prefix, hidden_info_key=hidden_info_key,
        )  # fmt: skip

    def bulk_import(
        self, images: Iterable[ImageImport], labels: Iterable[LabelImport] = (), *, now: Now = None
    ) -> BulkImportResult:
        return self._call("bulk_import", self.inner.bulk_import, images, labels, now=now)

    def delete_images(self, image_ids: Iterable[str]) -> int:
        return self._call("delete_images", self.inner.delete_images, image_ids)

    def delete_labels(self, keys: Iterable[tuple[str, str]]) -> int:
        return self._call("delete_labels", self.inner.delete_labels, keys)
