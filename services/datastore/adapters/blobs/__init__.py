"""Blob stores: where image, label and model bytes live, behind the ``BlobStore`` port.

Why two: `LocalBlobStore` (``local``) keeps MONAI Label's own studies-folder layout, so an
existing folder is adopted as is and MONAI Label can still open it afterwards; `S3BlobStore`
(``s3``) is for clusters. Both take finished, already-validated local files (`put_file`) so a
half-written upload is never visible, and both stream reads in chunks of at most 1 MiB so
memory stays constant whatever the volume size. Both are synchronous and safe to share
between threads. What they share (key rules, checks, the chunk stream) is in ``shared``.

Logical keys: ``images/<file>``, ``labels/<tag>/<file>``, ``models/<name>/<version>/<file>``.
"""

from __future__ import annotations

from services.datastore.adapters.blobs.local import LocalBlobStore
from services.datastore.adapters.blobs.s3 import S3BlobStore
from services.datastore.adapters.blobs.shared import (
    CHUNK_SIZE,
    MAX_URL_EXPIRY_SECONDS,
    MONAILABEL_IMAGE_EXTS,
    STALE_SPOOL_SECONDS,
)
from services.datastore.domain.ports import BlobInfo, BlobStore

__all__ = [
    "CHUNK_SIZE",
    "MAX_URL_EXPIRY_SECONDS",
    "MONAILABEL_IMAGE_EXTS",
    "STALE_SPOOL_SECONDS",
    "BlobInfo",
    "BlobStore",
    "LocalBlobStore",
    "S3BlobStore",
]
