"""The headers of a file download, the same whoever answers it: the gateway streaming it, or
S3 on a URL the datastore signed for a client (the gateway's download redirect)."""

from __future__ import annotations

import mimetypes
from urllib.parse import quote


def content_disposition(file_name: str) -> str:
    """`attachment; filename="x"` as Starlette's FileResponse writes it (the client parses it)."""
    quoted = quote(file_name)
    if quoted != file_name:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{file_name}"'


def media_type(file_name: str) -> str:
    """As MONAI Label: mimetypes' guess, `.nii.gz` (a gzip encoding) is octet-stream."""
    return mimetypes.guess_type(file_name)[0] or "application/octet-stream"
