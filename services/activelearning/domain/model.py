"""Values of the active learning domain: plain dataclasses and the scoring job's model, no protos."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.common.jobs import Job

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


class ScoringProgress(BaseModel):
    """How far a scoring job got: images to score, and what became of each so far."""

    model_config = ConfigDict(frozen=True)

    total: int = 0
    scored: int = 0
    skipped: int = 0
    failed: int = 0


class ScoringJob(Job):
    """A scoring job: the method, the model whose served version scores, and its progress."""

    method: str = ""
    model: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    force: bool = False
    model_version: str = ""
    progress: ScoringProgress = Field(default_factory=ScoringProgress)


@dataclass(frozen=True)
class JobPage:
    jobs: list[ScoringJob]
    next_page_token: str = ""
