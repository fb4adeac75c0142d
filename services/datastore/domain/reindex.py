"""Rebuilds the index from the blobs: adopts a MONAI Label folder or an S3 bucket as it is.

The blobs are the truth for what exists; the index is the truth for what we know about
it. So entries whose files are gone are dropped, files the index does not know are
added, and files whose size changed are re-hashed. Info comes, in this order, from the
index, from MONAI Label's datastore_v2.json (local backend), or MONAI Label's defaults.

A file is adopted only after the same format check an upload gets (services.common.formats:
header, indirection, sizes); one that fails is left where it is, not indexed, and reported
(`ReindexCounts.skipped`, and a warning in the log).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument
from services.datastore.domain import formats, ids
from services.datastore.domain.model import ImageFilter, ImageImport, ImageRecord, LabelImport
from services.datastore.domain.ports import BlobInfo, BlobStore, Index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReindexCounts:
    images: int
    labels: int
    model_versions: int
    removed: int
    # Files left out because they failed the format check: "key: why", in key order.
    skipped: tuple[str, ...] = ()


def _blob_sha256(blobs: BlobStore, blob: BlobInfo) -> str:
    """The stored digest if the store keeps one (S3 metadata), else a hash of the bytes."""
    stored = blob.sha256 or blobs.stat(blob.key).sha256
    if stored:
        return str(stored)
    digest = hashlib.sha256()
    for chunk in blobs.open_read(blob.key, 0, None):
        digest.update(chunk)
    return digest.hexdigest()


def _checked_sha256(blobs: BlobStore, blob: BlobInfo, ext: str) -> str:
    """The sha256 of a file to adopt, after the format check of an upload (InvalidArgument when
    it fails): the bytes are copied to a spool file, checked there and hashed on the way."""
    handle, name = tempfile.mkstemp(prefix="reindex-", suffix=ext, dir=blobs.spool_dir())
    path = Path(name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as out:
            for chunk in blobs.open_read(blob.key, 0, None):
                digest.update(chunk)
                out.write(chunk)
        formats.check_volume(path, ext)
        return blob.sha256 or digest.hexdigest()
    finally:
        path.unlink(missing_ok=True)


def _split_file(file_name: str, ext_of: Callable[[str], str]) -> tuple[str, str] | None:
    """(id, ext) of a file the datastore may hold, or None for anything else."""
    try:
        ext = ext_of(file_name)
        return ids.check_image_id(file_name[: -len(ext)]), ext
    except InvalidArgument:
        return None


def _all_images(index: Index) -> Iterator[ImageRecord]:
    token = ""
    while True:
        page = index.list_images(filter=ImageFilter.ALL, page_size=1000, page_token=token)
        yield from page.items
        token = page.next_page_token
        if not token:
            return


def _all_model_versions(index: Index) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    token = ""
    while True:
        page = index.list_models(page_size=1000, page_token=token)
        for model in page.items:
            version_token = ""
            while True:
                versions = index.list_model_versions(model.model, page_size=1000, page_token=version_token)
                found.update((v.model, v.version) for v in versions.items)
                version_token = versions.next_page_token
                if not version_token:
                    break
        token = page.next_page_token
        if not token:
            return found


def rebuild(blobs: BlobStore, index: Index, legacy_model: dict[str, Any] | None) -> ReindexCounts:
    known = {image.image_id: image for image in _all_images(index)}
    legacy = (legacy_model or {}).get("objects", {}) or {}

    images: dict[str, Any] = {}
    skipped: list[str] = []
    for blob in blobs.list("images/"):
        file_name = blob.key[len("images/") :]
        parsed = _split_file(file_name, formats.image_ext_from_name)
        if parsed is None or parsed[0] in images:
            log.warning("reindex: skipping %s (not an image name, or a second file for one id)", file_name)
            continue
        image_id, ext = parsed
        old = known.get(image_id)
        unchanged = old is not None and old.ext == ext and old.size == blob.size
        legacy_info = (legacy.get(image_id) or {}).get("image", {}).get("info")
        info = old.info if old is not None else legacy_info or {"ts": int(blob.mtime), "name": file_name}
        try:
            sha = old.sha256 if unchanged and old is not None else _checked_sha256(blobs, blob, ext)
        except InvalidArgument as err:
            skipped.append(f"{blob.key}: {err}")
            continue
        images[image_id] = ImageImport(image_id, ext, sha, blob.size, info, create_time=blob.mtime)

    labels: dict[tuple[str, str], Any] = {}
    for blob in blobs.list("labels/"):
        tag, _, file_name = blob.key[len("labels/") :].partition("/")
        parsed = _split_file(file_name, formats.label_ext_from_name) if "/" not in file_name else None
        if parsed is None or parsed[0] not in images or not _valid_tag(tag) or (parsed[0], tag) in labels:
            log.warning("reindex: skipping label %s (no such image, or not a label name)", blob.key)
            continue
        image_id, ext = parsed
        old_image = known.get(image_id)
        old_label = old_image.labels.get(tag) if old_image is not None else None
        unchanged = old_label is not None and old_label.ext == ext and old_label.size == blob.size
        legacy_info = ((legacy.get(image_id) or {}).get("labels", {}).get(tag) or {}).get("info")
        info = old_label.info if old_label is not None else legacy_info or {"ts": int(blob.mtime), "name": file_name}
        try:
            sha = old_label.sha256 if unchanged and old_label is not None else _checked_sha256(blobs, blob, ext)
        except InvalidArgument as err:
            skipped.append(f"{blob.key}: {err}")
            continue
        labels[(image_id, tag)] = LabelImport(image_id, tag, ext, sha, blob.size, info)

    # Unchanged rows are left alone by bulk_import, so reindexing an unchanged store is a no-op.
    index.bulk_import(images.values(), labels.values())
    gone_images = set(known) - set(images)
    gone_labels = {
        (image.image_id, tag)
        for image in known.values()
        if image.image_id in images
        for tag in image.labels
        if (image.image_id, tag) not in labels
    }
    removed = index.delete_images(gone_images) + index.delete_labels(gone_labels)

    versions = _all_model_versions(index)
    for blob in blobs.list("models/"):
        parts = blob.key.split("/")
        if len(parts) != 4 or not _valid_model(parts[1], parts[2]) or (parts[1], parts[2]) in versions:
            continue
        _, model, version, file_name = parts
        index.add_model_version(model, version, file_name, _blob_sha256(blobs, blob), blob.size, {}, {})
        versions.add((model, version))

    for problem in skipped:
        log.warning("reindex: skipping %s (failed the format check, left where it is, not indexed)", problem)
    status = index.status()
    return ReindexCounts(
        images=status.total,
        labels=sum(status.label_tags.values()),
        model_versions=len(versions),
        removed=removed,
        skipped=tuple(skipped),
    )


def _valid_tag(tag: str) -> bool:
    try:
        ids.check_tag(tag)
    except InvalidArgument:
        return False
    return True


def _valid_model(model: str, version: str) -> bool:
    try:
        ids.check_model_name(model)
        ids.check_version(version)
    except InvalidArgument:
        return False
    return True
