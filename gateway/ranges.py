"""Byte ranges of image and label downloads (RFC 9110 §14): a download resumed after a dropped
connection, or a reader that wants part of a file, asks for one range and gets a 206.

MONAI Label serves these files with Starlette's FileResponse, which answers ranges; so do the
S3 paths here (the edge and the client redirect pass Range on to S3). Anything other than one
well-formed byte range (several ranges, another unit, bad syntax) is ignored and the whole file
sent as a 200, which the RFC allows; a single range that starts past the end is a 416.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ONE_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
# Offsets and lengths go into int64 fields: anything larger means "past the end" or "to the end".
_BEYOND_ANY_FILE = 1 << 62


@dataclass(frozen=True)
class ByteRange:
    """`bytes=first-last` (last None: to the end), or `bytes=-suffix` (first None: the last bytes)."""

    first: int | None
    last: int | None

    @property
    def needs_size(self) -> bool:
        """A suffix range: where it starts depends on the file's size."""
        return self.first is None

    def read(self, size: int | None = None) -> tuple[int, int]:
        """(read_offset, read_limit) asked of the datastore (limit 0: to the end); `size` only
        for a suffix range."""
        if self.first is None:
            assert size is not None and self.last is not None
            return max(0, size - self.last), 0
        offset = min(self.first, _BEYOND_ANY_FILE)
        return offset, 0 if self.last is None else min(self.last - self.first + 1, _BEYOND_ANY_FILE)


def parse_range(header: str | None) -> ByteRange | None:
    """The one byte range asked for, or None to send the whole file."""
    if header is None:
        return None
    matched = _ONE_RANGE.fullmatch(header.strip().replace(" ", ""))
    if matched is None:
        return None
    first, last = (int(text) if text else None for text in matched.groups())
    if first is None and not last:  # "bytes=-" or "bytes=-0": nothing to send
        return None
    if first is not None and last is not None and last < first:
        return None
    return ByteRange(first, last)


def if_range_allows(if_range: str | None, etag: str) -> bool:
    """If-Range: the range only while the file is still the one the client has (the same
    strong ETag); a date or another tag asks for the whole file."""
    return if_range is None or (bool(etag) and if_range.strip() == etag)


def s3_answers_alike(range_header: str | None, if_range: str | None, etag: str, size: int) -> bool:
    """Whether S3, sent the client's Range without its conditional headers (the edge drops
    them), answers as the gateway's own stream would: no range, or one range in plain
    `bytes=first-last` form that starts within the file, asked of the version the client has
    (If-Range). Anything else (a range past the end: 416; several, malformed or beyond-int64
    ones: the whole file; a stale If-Range: the whole file) is answered by the stream."""
    if range_header is None:
        return True
    if _ONE_RANGE.fullmatch(range_header) is None:  # S3 may read other spellings otherwise
        return False
    wanted = parse_range(range_header)
    if wanted is None:
        return False
    if not if_range_allows(if_range, etag):
        return False
    if wanted.last is not None and wanted.last >= _BEYOND_ANY_FILE:
        return False
    return (wanted.first or 0) < size


def content_range(offset: int, length: int, size: int) -> str:
    return f"bytes {offset}-{offset + length - 1}/{size}"
