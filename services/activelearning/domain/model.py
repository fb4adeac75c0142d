"""Values of the active learning domain: plain dataclasses, no protos."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# No reason: an image was handed out. Else why none was (the proto's NoSampleReason names).
EMPTY, ALL_LABELED, ALL_LEASED = "EMPTY", "ALL_LABELED", "ALL_LEASED"
NO_SAMPLE_REASONS = (EMPTY, ALL_LABELED, ALL_LEASED)
UNTRAINED = "untrained"
"""The version name of an app's initial weights (nothing published yet), as inference names it."""


@dataclass(frozen=True)
class ImageEntry:
    """An image as the datastore lists it: what strategies, scoring and clients need of it."""

    image_id: str
    file_name: str
    sha256: str
    info: dict[str, Any]
    scores: dict[str, float]
    label_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Lease:
    """A client's lease on an image; times are timezone-aware UTC."""

    image_id: str
    client_id: str
    strategy: str
    acquire_time: datetime
    expire_time: datetime


@dataclass(frozen=True)
class Acquired:
    """What the datastore answered to one lease request: an image and its lease, or a reason."""

    image: ImageEntry | None = None
    lease: Lease | None = None
    no_image_reason: str = ""


@dataclass(frozen=True)
class NextSample:
    image: ImageEntry | None
    lease: Lease | None
    strategy_info: dict[str, Any] = field(default_factory=dict)
    no_sample_reason: str = ""


@dataclass(frozen=True)
class LeasePage:
    leases: list[Lease]
    next_page_token: str = ""


@dataclass(frozen=True)
class JobPage:
    jobs: list[dict[str, Any]]
    next_page_token: str = ""
