"""URLs a client outside the cluster downloads from S3 itself: the gateway's download redirect.

The datastore owns the S3 credentials, so it signs; the gateway has checked the caller's
token and the id before it asks. The URL is signed for the store's public endpoint (the
address clients reach, which the service itself may not) and carries the file name and media
type a download through the gateway answers with, so a client following the redirect saves
the same file under the same name.
"""

from __future__ import annotations

import time
from typing import Any

from services.common.downloads import media_type
from services.common.errors import FailedPrecondition, InvalidArgument
from services.datastore.domain.datastore import (
    MAX_URL_EXPIRY_SECONDS,
    Datastore,
    DownloadUrl,
    image_key,
    label_key,
    model_key,
)

DEFAULT_EXPIRY_SECONDS = 3600


def client_download_url(ds: Datastore, kind: str, parts: tuple[str, ...], expire_seconds: int) -> DownloadUrl:
    """A presigned GET of an image, a label or a model version on the S3 public endpoint;
    FailedPrecondition when the store has none (local and dicomweb backends, or S3 without
    `s3_public_endpoint`). NotFound for an unknown one, as a download."""
    blobs: Any = ds.blobs
    if not getattr(blobs, "client_urls", False):
        raise FailedPrecondition(
            "this datastore hands no download to clients directly (no S3 public endpoint is configured)",
            reason="NO_CLIENT_URLS",
        )
    if expire_seconds < 0 or expire_seconds > MAX_URL_EXPIRY_SECONDS:
        raise InvalidArgument(f"expire_seconds must be between 0 and {MAX_URL_EXPIRY_SECONDS}")
    expire_seconds = expire_seconds or DEFAULT_EXPIRY_SECONDS
    if kind == "image":
        image = ds.get_image(parts[0])
        key, file_name, size, sha = image_key(image.file_name), image.file_name, image.size, image.sha256
    elif kind == "label":
        label = ds.get_label(parts[0], parts[1])
        key, file_name, size, sha = label_key(label.tag, label.file_name), label.file_name, label.size, label.sha256
    else:
        version = ds.get_model_version(parts[0], parts[1])
        key = model_key(version.model, version.version, version.file_name)
        file_name, size, sha = version.file_name, version.size, version.sha256
    url = blobs.client_get_url(key, expire_seconds, file_name, media_type(file_name))
    return DownloadUrl(url, time.time() + expire_seconds, file_name, size, sha)
