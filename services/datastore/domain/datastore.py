"""The datastore's use cases: plain Python over a blob store and a SQL index.

Every write follows one order so that nothing half-done is ever visible: the upload is
spooled to a local file (hashed and size-limited while it arrives), checked to be a
readable volume, moved into the blob store in one atomic step, and only then recorded in
the index. Blob keys follow MONAI Label's studies layout, so the local backend stays a
folder MONAI Label itself can open.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from services.common import raw_labels
from services.common.chunks import SpooledFile, SpoolWriter, sha256_file
from services.common.downloads import media_type
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from services.common.paging import MAX_PAGE_SIZE
from services.common.paging import page_size as _page_size
from services.datastore.domain import formats, ids, limits
from services.datastore.domain.model import (
    DEFAULT_TAG_FINAL,
    DatastoreStatus,
    ImageFilter,
    ImageOrder,
    ImageRecord,
    LabelRecord,
    LeaseRecord,
    ModelRecord,
    ModelVersionRecord,
    Page,
    Record,
    SessionRecord,
)
from services.datastore.domain.ports import BlobStore, Index, replaced_blob_key
from services.datastore.domain.reindex import ReindexCounts, rebuild
from services.datastore.domain.streaming import StreamingSpool, streaming_store

_Record = TypeVar("_Record")

log = logging.getLogger(__name__)

MAX_URL_EXPIRY_SECONDS = 7 * 24 * 3600


class JsonMirrorLike(Protocol):
    """Keeps MONAI Label's datastore_v2.json in step with the index (local backend only)."""

    def mark_dirty(self) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BlobRead:
    """What a download stream announces first, then the chunks themselves."""

    file_name: str
    size: int  # size of the whole object
    sha256: str
    content_type: str
    offset: int
    length: int  # bytes this read carries
    chunks: Iterator[bytes]


@dataclass(frozen=True)
class DownloadUrl:
    url: str
    expire_time: float | None  # epoch seconds; None for file:// URLs
    file_name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class DatastoreInfo:
    display_name: str
    description: str
    backend: str
    location: str
    status: DatastoreStatus


def image_key(file_name: str) -> str:
    return f"images/{file_name}"


def label_key(tag: str, file_name: str) -> str:
    return f"labels/{tag}/{file_name}"


def model_key(model: str, version: str, file_name: str) -> str:
    return f"models/{model}/{version}/{file_name}"


def session_key(session: SessionRecord) -> str:
    return f"sessions/{session.session_id}{session.ext}"


LEGACY_SESSION_KIND = "sessions"
"""Records kind of the gateway's sessions before they were the datastore's (purged at start)."""


def check_session_id(value: str) -> str:
    """A session id is a canonical UUID (the datastore picks them): anything else is INVALID_INPUT."""
    try:
        if str(uuid.UUID(value)) == value:
            return value
    except (ValueError, TypeError, AttributeError):
        pass
    raise InvalidArgument(f"session id {value[:100]!r} is not a session id (a UUID such as CreateSession returns)")


def image_id_from_file_name(file_name: str) -> str:
    """MONAI Label's rule for an upload without an id: the base name minus all its suffixes."""
    base = os.path.basename(file_name)
    return base.split(".", 1)[0] if not base.startswith(".") else base


class _KeyedLocks:
    """One lock per id, so two uploads of the same image cannot interleave blob and index writes."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def __call__(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


class Datastore:
    """MONAI Label's Datastore interface, plus leases, model versions and records."""

    def __init__(
        self,
        blobs: BlobStore,
        index: Index,
        *,
        backend: str,
        location: str,
        max_upload_bytes: int,
        lease_ttl_seconds: float = 3600.0,
        session_max_expiry_seconds: int = 3600,
        sessions_per_client: int = 20,
        sessions_max: int = 500,
        session_purge_seconds: float = 0.0,
        export_idle_seconds: float = 300.0,
        mirror: JsonMirrorLike | None = None,
        legacy_model: Callable[[], dict[str, Any] | None] = lambda: None,
        display_name: str = "new-dataset",
        description: str = "New Dataset",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.blobs = blobs
        self.index = index
        self.backend = backend
        self.location = location
        self.max_upload_bytes = max_upload_bytes
        self.lease_ttl_seconds = lease_ttl_seconds
        self.session_max_expiry_seconds = session_max_expiry_seconds
        self.sessions_per_client = sessions_per_client
        self.sessions_max = sessions_max
        self.session_purge_seconds = session_purge_seconds
        self.export_idle_seconds = export_idle_seconds
        self._purge_stop = threading.Event()
        self._purge_thread: threading.Thread | None = None
        self.mirror = mirror
        self.legacy_model = legacy_model  # MONAI Label's datastore_v2.json, read at reindex
        self.display_name = display_name
        self.description = description
        self._clock = clock
        self._locks = _KeyedLocks()
        # Single-flight dataset export: the archive being built or not yet streamed and removed.
        self._export_guard = threading.Lock()
        self._export_path: Path | None = None
        self._export_active_at = 0.0  # when its archive was last written or read (export_progress)
        # Bumped after every write to images, labels or their info (see watch()).
        self._generation = 0
        self._watch_lock = threading.Lock()
        self._watchers: list[Callable[[], None]] = []
        # Set by open() when the index tells changes of other processes (SqlIndex.listen).
        self._index_exclusive: Callable[[], bool] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Adopts an existing folder or bucket the first time the index is empty."""
        if self.index.status().total == 0 and any(True for _ in self.blobs.list("images/")):
            counts = self.reindex()
            log.info("adopted existing store", extra={"images": counts.images, "labels": counts.labels})
        listen = getattr(self.index, "listen", None)
        if listen is not None:  # PostgreSQL: other replicas' writes come as notifications
            self._index_exclusive = listen(self._changed)
        self.sweep_sessions()
        self._changed()
        if self.session_purge_seconds > 0:
            self._purge_thread = threading.Thread(target=self._purge_loop, name="session-purge", daemon=True)
            self._purge_thread.start()

    def _purge_loop(self) -> None:
        """Every ``session_purge_seconds``: expired sessions' blobs and rows go (they are
        invisible from the moment they expire; this only frees their space)."""
        while not self._purge_stop.wait(self.session_purge_seconds):
            try:
                removed = self.purge_sessions()
            except Exception:  # the store may be down for a while: try again next round
                log.warning("purging expired sessions failed", exc_info=True)
                continue
            if removed:
                log.info("purged expired sessions", extra={"sessions": removed})

    def close(self) -> None:
        self._purge_stop.set()
        if self._purge_thread is not None:
            self._purge_thread.join(timeout=30)
        if self.mirror is not None:
            self.mirror.close()

    def _changed(self) -> None:
        """After a write has committed: a new generation, and every watcher is told."""
        with self._watch_lock:
            self._generation += 1
            watchers = list(self._watchers)
        for notify in watchers:
            notify()
        if self.mirror is not None:
            self.mirror.mark_dirty()

    @property
    def generation(self) -> int:
        """Changes after every write to images, labels or their info (counts, listings)."""
        return self._generation

    @property
    def exclusive(self) -> bool:
        """Whether ``generation`` sees every change to the index: on SQLite this object is
        its one writer; on PostgreSQL, which replicas share, only while the index listens
        to their notifications (SqlIndex.listen)."""
        if self._index_exclusive is not None:
            return self._index_exclusive()
        return getattr(self.index, "backend", "sqlite") != "postgresql"

    def watch(self, notify: Callable[[], None]) -> Callable[[], None]:
        """Calls ``notify()`` (from the writing thread; it must not block) after each change;
        returns the function that stops it."""
        with self._watch_lock:
            self._watchers.append(notify)

        def stop() -> None:
            with self._watch_lock:
                if notify in self._watchers:
                    self._watchers.remove(notify)

        return stop

    # -- info --------------------------------------------------------------------------

    def info(self) -> DatastoreInfo:
        return DatastoreInfo(self.display_name, self.description, self.backend, self.location, self.index.status())

    def status(self, hidden_id_prefix: str = "", hidden_info_key: str = "") -> DatastoreStatus:
        """Counts; images with that id prefix and a true info key (sessions) left out."""
        return self.index.status(hidden_id_prefix=hidden_id_prefix, hidden_info_key=hidden_info_key)

    def status_if_cached(self, hidden_id_prefix: str = "", hidden_info_key: str = "") -> DatastoreStatus | None:
        """``status()`` when the index answers it from memory (no I/O, safe on the event loop), else None."""
        return self.index.status_if_cached(hidden_id_prefix=hidden_id_prefix, hidden_info_key=hidden_info_key)

    def export_json_if_cached(self, hidden_id_prefix: str = "", hidden_info_key: str = "") -> bytes | None:
        """``export_json()`` when the index answers it from memory, else None."""
        return self.index.export_monailabel_json_if_cached(
            self.display_name, self.description, hidden_id_prefix=hidden_id_prefix, hidden_info_key=hidden_info_key
        )

    def export_json(self, hidden_id_prefix: str = "", hidden_info_key: str = "") -> bytes:
        """MONAI Label's datastore model (GET /datastore/?output=all) as JSON bytes, kept by
        the index and patched image by image after a change (its change log); the same
        images left out as in ``status``."""
        return self.index.export_monailabel_json(
            self.display_name,
            self.description,
            hidden_id_prefix=hidden_id_prefix,
            hidden_info_key=hidden_info_key,
        )

    # -- uploads -----------------------------------------------------------------------

    def new_spool(self, declared_size: int = 0, key: str | None = None) -> SpoolWriter:
        """A spool for one upload; refuses early when the declared size is already too large.

        With the blob `key` it will be stored under, on a store that can (S3), the spool is a
        StreamingSpool: the store receives it while it is written; `put_file` completes it
        and `release_spool` (called whatever happened) aborts what was not stored."""
        if declared_size > self.max_upload_bytes:
            raise ResourceExhausted(
                f"upload of {declared_size} bytes exceeds the limit of {self.max_upload_bytes} bytes",
                reason="PAYLOAD_TOO_LARGE",
            )
        store = streaming_store(self.blobs) if key is not None else None
        if store is not None and key is not None:
            return StreamingSpool(store, key, self.blobs.spool_dir(), self.max_upload_bytes, declared_size)
        # No fsync of the spool: put_file makes the stored object durable (local: fsync then
        # rename; S3: the object store), so an upload is synced once, not twice. A local spool
        # is written back while it arrives, so that fsync has little left to wait for.
        return SpoolWriter(
            self.blobs.spool_dir(),
            max_bytes=self.max_upload_bytes,
            fsync=False,
            writeback=getattr(self.blobs, "spools_become_blobs", False),
        )

    def new_image_spool(self, declared_size: int, image_id: str, file_name: str) -> SpoolWriter:
        """`new_spool` for an image upload, streamed to the key `add_image` will store it under
        (a plain spool when the header names none: add_image then refuses it precisely)."""
        try:
            ext = formats.image_ext_from_name(file_name)
            key = image_key(f"{ids.check_image_id(image_id or image_id_from_file_name(file_name))}{ext}")
        except InvalidArgument:
            key = None
        return self.new_spool(declared_size, key)

    def release_spool(self, path: Path) -> None:
        """Drops what a store streamed from the spool at `path` and did not store (no-op else)."""
        store = streaming_store(self.blobs)
        if store is not None:
            store.release_streamed(Path(path))

    def _discard(self, spooled: SpooledFile) -> None:
        Path(spooled.path).unlink(missing_ok=True)

    # -- images ------------------------------------------------------------------------

    def list_images(
        self,
        *,
        filter: ImageFilter = ImageFilter.ALL,
        tag: str = "",
        order: ImageOrder = ImageOrder.ID,
        score_key: str = "",
        page_size: int = 0,
        page_token: str = "",
        exclude_leased: bool = False,
    ) -> Page:
        tag = ids.check_tag(tag or DEFAULT_TAG_FINAL)
        if order is ImageOrder.SCORE_DESC:
            ids.check_record_key(score_key, "score key")
        size = _page_size(page_size)
        while True:
            page = self.index.list_images(
                filter=filter,
                tag=tag,
                order=order,
                score_key=score_key or None,
                page_size=size,
                page_token=page_token,
                exclude_leased=exclude_leased,
            )
            # A page whose infos outgrow a message is asked again, smaller: the keyset token of
            # the smaller page continues where it ends, so paging still yields every image once.
            if size == 1 or sum(map(limits.record_info_bytes, page.items)) <= limits.PAGE_INFO_BUDGET_BYTES:
                return page
            size = max(1, size // 2)

    def get_image(self, image_id: str) -> ImageRecord:
        return self.index.get_image(ids.check_image_id(image_id))

    def add_image(
        self,
        spooled: SpooledFile,
        *,
        image_id: str,
        file_name: str,
        info: dict[str, Any],
        fail_if_exists: bool = False,
    ) -> ImageRecord:
        """MONAI Label's add_image: stores a checked volume under its id, replacing an old one."""
        try:
            if not file_name:
                raise InvalidArgument("file_name is required: its extension tells the image format")
            ext = formats.image_ext_from_name(file_name)
            image_id = ids.check_image_id(image_id or image_id_from_file_name(file_name))
            limits.check_info(info, "image info")
            formats.check_volume(Path(spooled.path), ext)
        except BaseException:
            self._discard(spooled)
            raise
        # Whatever fails from here on (the index or the object store down) removes the spool:
        # put_file consumes it when it stores the blob.
        try:
            with self._locks(f"image:{image_id}"):
                old = self._find_image(image_id)
                if old is not None and fail_if_exists:
                    raise AlreadyExists(f"image {image_id!r} already exists", reason="ALREADY_EXISTS")
                stored_info = dict(info)
                stored_info["ts"] = int(self._clock())
                stored_info["name"] = f"{image_id}{ext}"
                key = image_key(f"{image_id}{ext}")
                record = self._store_blob(
                    key, spooled, old is not None and old.ext == ext,
                    lambda: self.index.upsert_image(image_id, ext, spooled.sha256, spooled.size, stored_info),
                )  # fmt: skip
                if old is not None and old.ext != ext:
                    self.blobs.delete(image_key(old.file_name))
        except BaseException:
            self._discard(spooled)
            raise
        self._changed()
        return record

    def _store_blob(self, key: str, spooled: SpooledFile, replaces: bool, index: Callable[[], _Record]) -> _Record:
        """Stores the spool under `key`, then runs `index()` (the row that commits it).

        If the index write fails, the store is as before: a blob under a key no row named is
        deleted again (best effort), so a refused write does not come back as an unindexed
        blob a reindex would adopt; when `replaces` (a row names `key` already), the old bytes
        were first kept aside under ``replaced/<write>/<key>`` (local: a hard link, S3: a server-side
        copy) and are moved back, so the row and its sha256 still describe what is stored.

        The index row is the commit point. A datastore killed between the steps leaves
        ``replaced/<write>/<key>``; fsck reports it and ``--repair`` moves it back only where its bytes
        are what the row describes and the blob under `key` is not (killed after storing the
        new bytes, before the row), and otherwise deletes it (the row committed the new bytes,
        or nothing changed yet): the committed state is never lost.
        """
        kept = replaced_blob_key(key) if replaces else None
        if kept is not None:
            try:
                self.blobs.copy(key, kept)
            except NotFound:
                kept = None  # the row's blob is gone already: nothing to keep
        try:
            self.blobs.put_file(key, Path(spooled.path), sha256=spooled.sha256)
        except BaseException:
            if kept is not None:
                with contextlib.suppress(Exception):
                    self.blobs.delete(kept)
            raise
        try:
            record = index()
        except BaseException:
            with contextlib.suppress(Exception):
                if kept is not None:
                    self.blobs.move(kept, key)
                else:
                    self.blobs.delete(key)
            raise
        if kept is not None:
            with contextlib.suppress(Exception):
                self.blobs.delete(kept)  # a leftover is only disk: fsck --repair drops it
        return record

    def _find_image(self, image_id: str) -> ImageRecord | None:
        try:
            return self.index.get_image(image_id)
        except NotFound:
            return None

    def read_image(self, image_id: str, offset: int = 0, limit: int = 0) -> BlobRead:
        image = self.get_image(image_id)
        return self._read(image_key(image.file_name), image.file_name, image.size, image.sha256, offset, limit)

    def delete_image(self, image_id: str) -> None:
        image_id = ids.check_image_id(image_id)
        with self._locks(f"image:{image_id}"):
            image = self.index.delete_image(image_id)
            # The index no longer knows it, so a failure below leaves only an orphan file,
            # which the next reindex adopts again rather than a listed image without bytes.
            for label in image.labels.values():
                self.blobs.delete(label_key(label.tag, label.file_name))
            self.blobs.delete(image_key(image.file_name))
        self._changed()

    def update_image_info(
        self, image_id: str, info: dict[str, Any], *, replace: bool = False, expected_revision: int | None = None
    ) -> ImageRecord:
        image_id = ids.check_image_id(image_id)
        limits.check_info(info if replace else {**self.index.get_image(image_id).info, **info}, "image info")
        record = self.index.update_image_info(image_id, info, replace=replace, expected_revision=expected_revision)
        self._changed()
        return record

    def set_score(self, image_id: str, key: str, value: float, model_version: str = "") -> ImageRecord:
        image_id = ids.check_image_id(image_id)
        ids.check_record_key(key, "score key")
        # MONAI Label's scoring methods write the score into the image info: keep that view,
        # in the same transaction as the indexed score.
        info = {key: float(value), f"{key}_ts": int(self._clock())}
        self.index.set_score(image_id, key, float(value), model_version, info=info)
        self._changed()
        return self.index.get_image(image_id)

    # -- labels ------------------------------------------------------------------------

    def get_label(self, image_id: str, tag: str) -> LabelRecord:
        return self.index.get_label(ids.check_image_id(image_id), ids.check_tag(tag or DEFAULT_TAG_FINAL))

    def add_label(
        self, spooled: SpooledFile, *, image_id: str, tag: str, file_name: str, info: dict[str, Any]
    ) -> LabelRecord:
        """MONAI Label's save_label: the label id equals the image id, the tag is the folder."""
        try:
            image_id = ids.check_image_id(image_id)
            tag = ids.check_tag(tag or DEFAULT_TAG_FINAL)
            if not file_name:
                raise InvalidArgument("file_name is required: its extension tells the label format")
            if raw_labels.is_raw_label(file_name):  # OHIF v2's label.bin: voxels on the image's grid
                spooled, file_name = self._label_from_raw(spooled, image_id), f"{image_id}.nii.gz"
            ext = formats.label_ext_from_name(file_name)
            limits.check_info(info, "label info")
            formats.check_volume(Path(spooled.path), ext)
        except BaseException:
            self._discard(spooled)
            raise
        try:  # as in add_image: any failure removes the spool
            with self._locks(f"image:{image_id}"):
                old = self.index.find_label(image_id, tag)  # an unknown image: NotFound before anything is stored
                stored_info = dict(info)
                stored_info["ts"] = int(self._clock())
                stored_info["name"] = f"{image_id}{ext}"
                key = label_key(tag, f"{image_id}{ext}")
                record = self._store_blob(
                    key, spooled, old is not None and old.ext == ext,
                    lambda: self.index.upsert_label(image_id, tag, ext, spooled.sha256, spooled.size, stored_info),
                )  # fmt: skip
                if old is not None and old.ext != ext:
                    self.blobs.delete(label_key(tag, old.file_name))
        except BaseException:
            self._discard(spooled)
            raise
        self._changed()
        return record

    def _label_from_raw(self, raw: SpooledFile, image_id: str) -> SpooledFile:
        """The raw label converted against the stored image (MONAI Label's binary_to_image); the
        raw upload is removed, the converted file replaces it."""
        image = self.index.get_image(image_id)
        spool_dir = Path(self.blobs.spool_dir())
        handle, name = tempfile.mkstemp(prefix="image-", suffix=image.ext, dir=spool_dir)
        image_path = Path(name)
        try:
            with os.fdopen(handle, "wb") as out:
                for chunk in self.blobs.open_read(image_key(image.file_name)):
                    out.write(chunk)
            label_path = raw_labels.raw_label_to_nifti(Path(raw.path), image_path, image.file_name, spool_dir)
        finally:
            image_path.unlink(missing_ok=True)
        self._discard(raw)
        return SpooledFile(label_path, label_path.stat().st_size, sha256_file(label_path))

    def read_label(self, image_id: str, tag: str, offset: int = 0, limit: int = 0) -> BlobRead:
        label = self.get_label(image_id, tag)
        return self._read(
            label_key(label.tag, label.file_name), label.file_name, label.size, label.sha256, offset, limit
        )

    def delete_label(self, image_id: str, tag: str) -> None:
        image_id = ids.check_image_id(image_id)
        tag = ids.check_tag(tag or DEFAULT_TAG_FINAL)
        with self._locks(f"image:{image_id}"):
            label = self.index.delete_label(image_id, tag)
            self.blobs.delete(label_key(label.tag, label.file_name))
        self._changed()

    def update_label_info(
        self,
        image_id: str,
        tag: str,
        info: dict[str, Any],
        *,
        replace: bool = False,
        expected_revision: int | None = None,
    ) -> LabelRecord:
        image_id, tag = ids.check_image_id(image_id), ids.check_tag(tag or DEFAULT_TAG_FINAL)
        limits.check_info(info if replace else {**self.index.get_label(image_id, tag).info, **info}, "label info")
        record = self.index.update_label_info(
            image_id,
            tag,
            info,
            replace=replace,
            expected_revision=expected_revision,
        )
        self._changed()
        return record

    # -- reading and URLs --------------------------------------------------------------

    def _read(self, key: str, file_name: str, size: int, sha256: str, offset: int, limit: int) -> BlobRead:
        if offset < 0 or limit < 0:
            raise InvalidArgument("read_offset and read_limit may not be negative")
        if offset > size or (offset == size and size > 0):
            raise OutOfRange(f"read_offset {offset} lies beyond the end of {file_name!r} ({size} bytes)")
        length = size - offset if limit == 0 else min(limit, size - offset)
        chunks = self.blobs.open_read(key, offset, length) if length > 0 else iter(())
        return BlobRead(file_name, size, sha256, content_type_of(file_name), offset, length, chunks)

    def download_url(
        self,
        kind: str,
        parts: tuple[str, ...],
        expire_seconds: int,
        *,
        for_client: bool = False,
        for_edge: bool = False,
    ) -> DownloadUrl:
        """A URL reading an image, a label or a model version without this service.

        `for_client`: for a client outside the cluster (the gateway's download redirect, after
        its auth check): signed for the S3 store's public endpoint, which clients reach and this
        service may not, and carrying the file name and media type a download through the
        gateway answers with. FailedPrecondition where the store signs none (local and dicomweb
        backends, or S3 without `s3_public_endpoint`).
        `for_edge`: the same answer headers, signed for the endpoint this service uses, for the
        edge proxy that follows the gateway's redirect itself (the client sees only the bytes).
        FailedPrecondition where the store signs no S3 URL (local and dicomweb backends).
        """
        blobs: Any = self.blobs
        if for_client and for_edge:
            raise InvalidArgument("for_client and for_edge exclude each other")
        if for_client and not getattr(blobs, "client_urls", False):
            raise FailedPrecondition(
                "this datastore hands no download to clients directly (no S3 public endpoint is configured)"
            )
        if for_edge and not getattr(blobs, "edge_urls", False):
            raise FailedPrecondition("this datastore signs no S3 URL the edge could follow (not an S3 backend)")
        if expire_seconds < 0 or expire_seconds > MAX_URL_EXPIRY_SECONDS:
            raise InvalidArgument(f"expire_seconds must be between 0 and {MAX_URL_EXPIRY_SECONDS}")
        expire_seconds = expire_seconds or 3600
        if kind == "image":
            image = self.get_image(parts[0])
            key, file_name, size, sha = image_key(image.file_name), image.file_name, image.size, image.sha256
        elif kind == "label":
            label = self.get_label(parts[0], parts[1])
            key, file_name, size, sha = label_key(label.tag, label.file_name), label.file_name, label.size, label.sha256
        else:
            version = self.get_model_version(parts[0], parts[1])
            key = model_key(version.model, version.version, version.file_name)
            file_name, size, sha = version.file_name, version.size, version.sha256
        if for_client or for_edge:
            url = blobs.client_get_url(key, expire_seconds, file_name, media_type(file_name), public=for_client)
        else:
            url = self.blobs.presigned_get_url(key, expire_seconds)
        expire = None if url.startswith("file://") else self._clock() + expire_seconds
        return DownloadUrl(url, expire, file_name, size, sha)

    def export_dataset(self, limit_cases: int = 0, tag: str = "") -> Path:
        """MONAI Label's get_dataset_archive: a ZIP of labeled images, labels and metadata.json.

        Built in the spool folder and returned as a path; the caller streams and deletes it.
        """
        tag = ids.check_tag(tag or DEFAULT_TAG_FINAL)
        if limit_cases < 0:
            raise InvalidArgument("limit_cases may not be negative")
        images = list(self._all_images(filter=ImageFilter.LABELED, tag=tag))
        if not images:
            raise FailedPrecondition(f"no image has a {tag!r} label yet: nothing to export")
        if limit_cases:
            images = images[:limit_cases]
        path = self._reserve_export()
        try:
            with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                for image in images:
                    label = image.labels[tag]
                    self._zip_blob(archive, f"image/{image.file_name}", image_key(image.file_name))
                    self._zip_blob(archive, f"label/{label.file_name}", label_key(tag, label.file_name))
                archive.writestr("metadata.json", json.dumps(self.index.export_monailabel_model(), indent=2))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def _reserve_export(self) -> Path:
        """The new archive's path, or RESOURCE_EXHAUSTED (ALREADY_RUNNING, a 429) while the
        previous one still exists: each export is a full copy of the labeled data on scratch, so
        one runs at a time, until its caller has streamed and removed it.

        A previous export that was neither built nor read for `export_idle_seconds` (a stalled
        download) loses the slot: its archive is unlinked. A stream that has the file open keeps
        reading it (POSIX), so a slow consumer that resumes still gets the whole archive."""
        with self._export_guard:
            previous = self._export_path
            if previous is not None and previous.exists():
                idle = self._clock() - self._export_active_at
                if idle < self.export_idle_seconds:
                    raise ResourceExhausted(
                        "a dataset export is already running: retry once it has been downloaded",
                        reason="ALREADY_RUNNING",
                    )
                previous.unlink(missing_ok=True)
                log.warning("a stalled dataset export gave up its slot", extra={"idle_seconds": round(idle)})
            fd, name = tempfile.mkstemp(prefix="dataset-", suffix=".zip", dir=self.blobs.spool_dir())
            os.close(fd)
            self._export_path = Path(name)
            self._export_active_at = self._clock()
            return self._export_path

    def export_progress(self) -> None:
        """The export's archive was written or a chunk of it read: its slot is in use."""
        self._export_active_at = self._clock()

    def _zip_blob(self, archive: zipfile.ZipFile, arcname: str, key: str) -> None:
        with archive.open(arcname, "w", force_zip64=True) as member:
            for chunk in self.blobs.open_read(key, 0, None):
                member.write(chunk)
                self.export_progress()

    def _all_images(self, **query: Any) -> Iterator[ImageRecord]:
        token = ""
        while True:
            page = self.index.list_images(page_size=MAX_PAGE_SIZE, page_token=token, **query)
            yield from page.items
            token = page.next_page_token
            if not token:
                return

    # -- reindex -----------------------------------------------------------------------

    def reindex(self) -> ReindexCounts:
        """Rebuilds images, labels and model versions from the blobs (MONAI Label's refresh)."""
        with self._locks("reindex"):
            counts = rebuild(self.blobs, self.index, self.legacy_model())
        self._changed()
        return counts

    # -- leases ------------------------------------------------------------------------

    def acquire_lease(
        self,
        client_id: str,
        strategy: str,
        *,
        order: ImageOrder = ImageOrder.ID,
        score_key: str = "",
        tag: str = "",
        ttl_seconds: float = 0,
    ) -> tuple[ImageRecord, LeaseRecord] | str:
        """Leases the next image, or returns why none is left ("EMPTY", "ALL_LABELED", "ALL_LEASED")."""
        ids.check_record_key(client_id, "client_id")
        ids.check_record_key(strategy or "default", "strategy")
        tag = ids.check_tag(tag or DEFAULT_TAG_FINAL)
        if order is ImageOrder.SCORE_DESC:
            ids.check_record_key(score_key, "score key")
        limits.check_ttl(ttl_seconds)
        got = self.index.acquire_next_lease(
            client_id,
            strategy or "default",
            order=order,
            score_key=score_key or None,
            tag=tag,
            ttl_seconds=ttl_seconds or self.lease_ttl_seconds,
        )
        if got is not None:
            return got
        return self.index.no_lease_reason(tag)

    def renew_lease(self, image_id: str, client_id: str, ttl_seconds: float = 0) -> LeaseRecord:
        limits.check_ttl(ttl_seconds)
        return self.index.renew_lease(
            ids.check_image_id(image_id),
            ids.check_record_key(client_id, "client_id"),
            ttl_seconds or self.lease_ttl_seconds,
        )

    def release_lease(self, image_id: str, client_id: str) -> None:
        self.index.release_lease(ids.check_image_id(image_id), ids.check_record_key(client_id, "client_id"))

    def list_leases(self, client_id: str = "", page_size: int = 0, page_token: str = "") -> Page:
        if client_id:
            ids.check_record_key(client_id, "client_id")
        return self.index.list_leases(client_id or None, page_size=_page_size(page_size), page_token=page_token)

    # -- models ------------------------------------------------------------------------

    def add_model_version(
        self,
        spooled: SpooledFile,
        *,
        model: str,
        version: str,
        file_name: str,
        metrics: dict[str, Any],
        info: dict[str, Any],
    ) -> ModelVersionRecord:
        try:
            ids.check_model_name(model)
            if version:
                ids.check_version(version)
                if version == "serving":
                    raise InvalidArgument("'serving' is reserved: it names the version inference serves")
            ids.check_record_key(file_name or "", "model file name")
            limits.check_info(metrics, "model version metrics")
            limits.check_info(info, "model version info")
        except BaseException:
            self._discard(spooled)
            raise
        with self._locks(f"model:{model}"):
            # The index numbers the version; the blob is keyed by it, so record first under
            # a lock and remove the record again if the blob cannot be stored.
            try:
                record = self.index.add_model_version(
                    model, version or None, file_name, spooled.sha256, spooled.size, metrics, info
                )
            except BaseException:
                self._discard(spooled)
                raise
            try:
                self.blobs.put_file(
                    model_key(model, record.version, file_name), Path(spooled.path), sha256=spooled.sha256
                )
            except BaseException:
                self.index.delete_model_version(model, record.version)
                self._discard(spooled)
                raise
        return record

    def get_model(self, model: str) -> ModelRecord:
        return self.index.get_model(ids.check_model_name(model))

    def list_models(self, page_size: int = 0, page_token: str = "") -> Page:
        return self.index.list_models(page_size=_page_size(page_size), page_token=page_token)

    def get_model_version(self, model: str, version: str) -> ModelVersionRecord:
        ids.check_model_name(model)
        if version == "serving":
            serving = self.index.get_model(model).serving_version
            if not serving:
                raise NotFound(f"model {model!r} has no published version", reason="MODEL_NOT_FOUND")
            version = serving
        return self.index.get_model_version(model, ids.check_version(version))

    def list_model_versions(self, model: str, page_size: int = 0, page_token: str = "") -> Page:
        return self.index.list_model_versions(
            ids.check_model_name(model), page_size=_page_size(page_size), page_token=page_token
        )

    def read_model_version(self, model: str, version: str, offset: int = 0, limit: int = 0) -> BlobRead:
        record = self.get_model_version(model, version)
        key = model_key(record.model, record.version, record.file_name)
        return self._read(key, record.file_name, record.size, record.sha256, offset, limit)

    def delete_model_version(self, model: str, version: str) -> None:
        ids.check_model_name(model)
        ids.check_version(version)
        with self._locks(f"model:{model}"):
            if self.index.get_model(model).pinned_version == version:
                raise FailedPrecondition(f"version {version!r} of model {model!r} is pinned: unpin it first")
            record = self.index.delete_model_version(model, version)
            self.blobs.delete(model_key(record.model, record.version, record.file_name))

    def pin_model_version(self, model: str, version: str) -> ModelRecord:
        ids.check_model_name(model)
        return self.index.pin_model_version(model, ids.check_version(version) if version else None)

    # -- sessions ----------------------------------------------------------------------

    def create_session(
        self, spooled: SpooledFile, *, file_name: str, owner: str, meta: dict[str, Any], expiry_seconds: int = 0
    ) -> SessionRecord:
        """MONAI Label's add session: a checked volume kept under a new id until it expires.

        The row is inserted first, under the caps (atomic with their count), then the blob
        stored; a refused or failed create leaves neither behind."""
        try:
            if not file_name:
                raise InvalidArgument("file_name is required: its extension tells the session's format")
            ext = formats.image_ext_from_name(file_name)
            if expiry_seconds < 0:
                raise InvalidArgument(f"expiry_seconds may not be negative, got {expiry_seconds}")
            limits.check_info(meta, "session meta")
            formats.check_volume(Path(spooled.path), ext)
        except BaseException:
            self._discard(spooled)
            raise
        lifetime = self.session_max_expiry_seconds
        if 0 < expiry_seconds < lifetime:
            lifetime = int(expiry_seconds)
        session_id = str(uuid.uuid4())
        try:
            session = self.index.create_session(
                session_id,
                owner=owner,
                file_name=os.path.basename(file_name),
                ext=ext,
                sha256=spooled.sha256,
                size=spooled.size,
                meta=meta,
                expiry_seconds=lifetime,
                per_owner=self.sessions_per_client,
                total=self.sessions_max,
                now=self._clock(),
            )
        except BaseException:
            self._discard(spooled)
            raise
        try:
            self.blobs.put_file(session_key(session), Path(spooled.path), sha256=spooled.sha256)
        except BaseException:
            self._discard(spooled)
            with contextlib.suppress(Exception):
                self.index.delete_session(session_id, now=self._clock())
            raise
        return session

    def get_session(self, session_id: str, *, touch: bool = False) -> SessionRecord:
        """A live session (NOT_FOUND once expired); ``touch`` pushes its expiry back."""
        session_id = check_session_id(session_id)
        if touch:
            return self.index.touch_session(session_id, now=self._clock())
        return self.index.get_session(session_id, now=self._clock())

    def read_session(self, session_id: str, offset: int = 0, limit: int = 0) -> BlobRead:
        session = self.get_session(session_id)
        return self._read(session_key(session), session.file_name, session.size, session.sha256, offset, limit)

    def delete_session(self, session_id: str) -> SessionRecord:
        session = self.index.delete_session(check_session_id(session_id), now=self._clock())
        # The row is gone first: a failure below leaves an orphan blob for the next sweep.
        self.blobs.delete(session_key(session))
        return session

    def purge_sessions(self) -> int:
        """Deletes expired sessions (blob, then row); returns how many. Run periodically."""
        removed = 0
        now = self._clock()
        while True:
            expired = self.index.expired_sessions(now=now, limit=500)
            for session in expired:
                self.blobs.delete(session_key(session))
                if self.index.remove_expired_session(session.session_id, now=now):
                    removed += 1
            if len(expired) < 500:
                return removed

    def sweep_sessions(self) -> None:
        """At start: expired sessions, blobs under sessions/ without a row (a crash between the
        two deletes), and the gateway's sessions from before they were the datastore's
        (``session-*`` images and their ``records/sessions/*``): sessions are ephemeral."""
        self.purge_sessions()
        # Files first, rows second: a create inserts its row before it stores its file, so a
        # file listed here whose row is missing is an orphan, even with replicas creating.
        files = list(self.blobs.list("sessions/"))
        known = self.index.session_ids()
        for blob in files:
            name = blob.key[len("sessions/") :]
            if name[:36] not in known:
                self.blobs.delete(blob.key)
        token, legacy = "", list[str]()
        while True:
            page = self.index.list_records(LEGACY_SESSION_KIND, page_size=MAX_PAGE_SIZE, page_token=token)
            legacy.extend(record.record_id for record in page.items)
            token = page.next_page_token
            if not token:
                break
        for record_id in legacy:
            with contextlib.suppress(NotFound):
                self.delete_image(f"session-{record_id}")
            with contextlib.suppress(NotFound):
                self.index.delete_record(LEGACY_SESSION_KIND, record_id)
        if legacy:
            log.info("removed sessions stored as images by an older gateway", extra={"sessions": len(legacy)})

    # -- records -----------------------------------------------------------------------

    def put_record(
        self, kind: str, record_id: str, data: dict[str, Any], expected_revision: int | None = None
    ) -> Record:
        kind, record_id = ids.check_record_key(kind, "record kind"), ids.check_record_key(record_id)
        limits.check_info(data, "record data")
        return self.index.put_record(kind, record_id, data, expected_revision)

    def get_record(self, kind: str, record_id: str) -> Record:
        return self.index.get_record(ids.check_record_key(kind, "record kind"), ids.check_record_key(record_id))

    def list_records(self, kind: str, page_size: int = 0, page_token: str = "") -> Page:
        return self.index.list_records(
            ids.check_record_key(kind, "record kind"), page_size=_page_size(page_size), page_token=page_token
        )

    def delete_record(self, kind: str, record_id: str, expected_revision: int | None = None) -> None:
        if expected_revision is not None and expected_revision < 0:
            raise InvalidArgument(f"expected_revision must be 0 (any) or a record's revision, got {expected_revision}")
        self.index.delete_record(
            ids.check_record_key(kind, "record kind"), ids.check_record_key(record_id), expected_revision or None
        )


def content_type_of(file_name: str) -> str:
    if file_name.endswith(".zip"):
        return "application/zip"
    return "application/octet-stream"
