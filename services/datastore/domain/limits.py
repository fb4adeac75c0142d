"""Size limits of what the datastore keeps beside the files: info documents and list pages.

An info (image, label, model version, record) is capped when written, so a listing page of
them always fits in a gRPC message: ``MAX_INFO_BYTES`` each, and list pages shrink until their
infos take at most ``PAGE_INFO_BUDGET_BYTES`` (stores written before the cap included).
"""

from __future__ import annotations

import json
import math
from typing import Any

from services.common.errors import InvalidArgument, ResourceExhausted

MAX_INFO_BYTES = 64 * 1024
"""Largest info document, as compact JSON (MONAI Label's infos are a few hundred bytes)."""

PAGE_INFO_BUDGET_BYTES = 4 * 1024 * 1024
"""Most info bytes in one list page: half the default 8 MiB gRPC message, the rest for the
records' other fields."""


MAX_LEASE_TTL_SECONDS = 7 * 24 * 3600.0
"""Longest lease a client may ask for (0 is the service's default): a lease hides an image from
every other annotator, so none may outlive a week."""


def check_ttl(ttl_seconds: float) -> None:
    """INVALID_ARGUMENT for a lease TTL that is negative, not finite or over a week."""
    if not math.isfinite(ttl_seconds) or not 0 <= ttl_seconds <= MAX_LEASE_TTL_SECONDS:
        raise InvalidArgument(
            f"ttl_seconds must be between 0 (the default) and {MAX_LEASE_TTL_SECONDS:g}, got {ttl_seconds!r}"
        )


def info_bytes(info: Any) -> int:
    """The size of `info` as compact JSON."""
    return len(json.dumps(info, separators=(",", ":"), ensure_ascii=False, default=str).encode())


def check_info(info: dict[str, Any], what: str) -> None:
    """RESOURCE_EXHAUSTED (PAYLOAD_TOO_LARGE, a 413 at the gateway) when `info` is over MAX_INFO_BYTES."""
    size, limit = info_bytes(info), MAX_INFO_BYTES
    if size > limit:
        raise ResourceExhausted(
            f"the {what} would be {size} bytes of JSON, over the limit of {limit}: keep large data in files",
            reason="PAYLOAD_TOO_LARGE",
        )


def record_info_bytes(record: Any) -> int:
    """Info bytes of one listed record: its own info plus its labels' (images)."""
    size = info_bytes(getattr(record, "info", None) or getattr(record, "data", None) or {})
    for label in (getattr(record, "labels", None) or {}).values():
        size += info_bytes(label.info or {})
    return size
