"""What the datastore's domain needs from the outside: a byte store and a metadata index.

The adapters implement these (``adapters/blobs``: local folder, S3; ``adapters/index``:
SQLite, PostgreSQL); the domain is typed against them only. Each Protocol lists exactly the
methods the domain calls, with the adapters' signatures.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from services.common.paging import DEFAULT_PAGE_SIZE
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

Now = datetime | float | None
"""A point in time for the index: naive datetimes are UTC, floats epoch seconds, None now."""

REPLACED_AREA = "replaced"
"""``replaced/<write>/<key>``: the old bytes of an image or label kept aside while a replacement
is indexed (Datastore._store_blob); fsck restores or drops what a killed datastore left there.
`<write>` is a fresh hex token per replacement, so two datastore replicas replacing the same
object at once never share (and overwrite) one kept copy. Before it, the layout was
``replaced/<key>``: what such a version left is still read."""

_REPLACED_WRITE_CHARS = frozenset("0123456789abcdef")


def replaced_blob_key(key: str) -> str:
    """Where one replacement keeps the old bytes of `key` aside."""
    return f"{REPLACED_AREA}/{uuid.uuid4().hex}/{key}"


def is_replaced_write_token(part: str) -> bool:
    return len(part) == 32 and set(part) <= _REPLACED_WRITE_CHARS


def replaced_original_key(kept: str) -> str:
    """The key whose old bytes `kept` holds (either layout of REPLACED_AREA)."""
    parts = kept.split("/")
    if len(parts) >= 3 and is_replaced_write_token(parts[1]):
        return "/".join(parts[2:])
    return "/".join(parts[1:])


NoLeaseReason = Literal["EMPTY", "ALL_LABELED", "ALL_LEASED"]


@dataclass(frozen=True)
class BlobInfo:
    """One stored object; `sha256` is None where the store does not keep it (local files, S3 listings)."""

    key: str
    size: int
    sha256: str | None
    mtime: float


@dataclass(frozen=True)
class BulkImportResult:
    images_added: int
    images_updated: int  # existing rows whose file facts or info changed
    images_unchanged: int
    labels_added: int
    labels_updated: int
    labels_unchanged: int
    labels_skipped: int  # labels of images that are neither indexed nor imported


@runtime_checkable
class BlobStore(Protocol):
    """Where image, label and model bytes live.

    Logical keys: ``images/<file>``, ``labels/<tag>/<file>``, ``models/<name>/<version>/<file>``,
    ``sessions/<file>``.
    """

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

    def copy(self, source_key: str, target_key: str) -> None:
        """`target_key` becomes a copy of `source_key` (replacing any old one), cheaply where the
        store can (local: a hard link; S3: a server-side copy); NotFound without a source."""
        ...

    def move(self, source_key: str, target_key: str) -> None:
        """`source_key` becomes `target_key` (replacing any old one; local: a rename)."""
        ...

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


@runtime_checkable
class Index(Protocol):
    """The metadata index: images, labels, scores, leases, model versions, records.

    Every method is synchronous and thread-safe and returns the plain types of
    ``domain.model``; storage failures surface as ``StorageError``.
    """

    @property
    def backend(self) -> str:
        """ "sqlite" (this process is the only writer) or "postgresql" (replicas share it)."""
        ...

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
    ) -> ImageRecord: ...

    def get_image(self, image_id: str) -> ImageRecord: ...

    def delete_image(self, image_id: str) -> ImageRecord: ...

    def update_image_info(
        self,
        image_id: str,
        info: Mapping[str, Any],
        *,
        replace: bool = False,
        expected_revision: int | None = None,
        now: Now = None,
    ) -> ImageRecord: ...

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
    ) -> LabelRecord: ...

    def get_label(self, image_id: str, tag: str) -> LabelRecord: ...

    def find_label(self, image_id: str, tag: str) -> LabelRecord | None:
        """None if the image has no label under `tag`; NOT_FOUND (IMAGE_NOT_FOUND) if the image is unknown."""
        ...

    def delete_label(self, image_id: str, tag: str) -> LabelRecord: ...

    def update_label_info(
        self,
        image_id: str,
        tag: str,
        info: Mapping[str, Any],
        *,
        replace: bool = False,
        expected_revision: int | None = None,
        now: Now = None,
    ) -> LabelRecord: ...

    def set_score(
        self,
        image_id: str,
        key: str,
        value: float,
        model_version: str = "",
        *,
        info: Mapping[str, Any] | None = None,
        now: Now = None,
    ) -> None: ...

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
    ) -> Page[ImageRecord]: ...

    def status(self, *, hidden_id_prefix: str = "", hidden_info_key: str = "") -> DatastoreStatus: ...

    def status_if_cached(self, *, hidden_id_prefix: str = "", hidden_info_key: str = "") -> DatastoreStatus | None: ...

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
    ) -> tuple[ImageRecord, LeaseRecord] | None: ...

    def no_lease_reason(self, tag: str = DEFAULT_TAG_FINAL, *, now: Now = None) -> NoLeaseReason: ...

    def renew_lease(self, image_id: str, client_id: str, ttl_seconds: float, *, now: Now = None) -> LeaseRecord: ...

    def release_lease(self, image_id: str, client_id: str, *, now: Now = None) -> None: ...

    def list_leases(
        self,
        client_id: str | None = None,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        now: Now = None,
    ) -> Page[LeaseRecord]: ...

    def expire_leases(self, now: Now = None) -> int: ...

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
    ) -> ModelVersionRecord: ...

    def get_model(self, name: str) -> ModelRecord: ...

    def list_models(self, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "") -> Page[ModelRecord]: ...

    def list_model_versions(
        self, name: str, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> Page[ModelVersionRecord]: ...

    def get_model_version(self, name: str, version: str) -> ModelVersionRecord: ...

    def delete_model_version(self, name: str, version: str) -> ModelVersionRecord: ...

    def pin_model_version(self, name: str, version: str | None) -> ModelRecord: ...

    # -- records

    def put_record(
        self,
        kind: str,
        record_id: str,
        data: Mapping[str, Any],
        expected_revision: int | None = None,
        *,
        now: Now = None,
    ) -> Record: ...

    def get_record(self, kind: str, record_id: str) -> Record: ...

    def list_records(self, kind: str, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "") -> Page[Record]: ...

    def delete_record(self, kind: str, record_id: str, expected_revision: int | None = None) -> Record: ...

    # -- sessions (live until their expire_time; reads take the time they judge it by)

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
    ) -> SessionRecord: ...

    def get_session(self, session_id: str, *, now: Now = None) -> SessionRecord: ...

    def touch_session(self, session_id: str, *, now: Now = None) -> SessionRecord: ...

    def delete_session(self, session_id: str, *, now: Now = None) -> SessionRecord: ...

    def expired_sessions(self, *, now: Now = None, limit: int = 1000) -> list[SessionRecord]: ...

    def remove_expired_session(self, session_id: str, *, now: Now = None) -> bool: ...

    def session_ids(self) -> set[str]: ...

    # -- MONAI Label's datastore model, reindex

    def export_monailabel_model(
        self, name: str = "new-dataset", description: str = "New Dataset"
    ) -> dict[str, Any]: ...

    def export_monailabel_json(
        self,
        name: str = "new-dataset",
        description: str = "New Dataset",
        *,
        hidden_id_prefix: str = "",
        hidden_info_key: str = "",
    ) -> bytes: ...

    def export_monailabel_json_if_cached(
        self,
        name: str = "new-dataset",
        description: str = "New Dataset",
        *,
        hidden_id_prefix: str = "",
        hidden_info_key: str = "",
    ) -> bytes | None: ...

    def bulk_import(
        self, images: Iterable[ImageImport], labels: Iterable[LabelImport] = (), *, now: Now = None
    ) -> BulkImportResult: ...

    def delete_images(self, image_ids: Iterable[str]) -> int: ...

    def delete_labels(self, keys: Iterable[tuple[str, str]]) -> int: ...
