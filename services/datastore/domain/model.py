"""Plain data types of the datastore domain (no gRPC, no SQL)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

T = TypeVar("T")

DEFAULT_TAG_FINAL = "final"  # MONAI Label's DefaultLabelTag.FINAL: a submitted label
DEFAULT_TAG_ORIGINAL = "original"  # MONAI Label's DefaultLabelTag.ORIGINAL: a model's prediction


@dataclass(frozen=True)
class LabelRecord:
    image_id: str
    tag: str
    ext: str  # ".nii.gz", ".nrrd", ... as in MONAI Label's datastore_v2.json
    sha256: str  # hex digest of the stored bytes
    size: int
    info: dict[str, Any]
    revision: int
    create_time: datetime
    update_time: datetime

    @property
    def file_name(self) -> str:
        return f"{self.image_id}{self.ext}"


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    ext: str
    sha256: str
    size: int
    info: dict[str, Any]
    revision: int
    create_time: datetime
    update_time: datetime
    labels: dict[str, LabelRecord] = field(default_factory=dict)  # tag -> label
    scores: dict[str, float] = field(default_factory=dict)  # score key -> value (scoring methods)

    @property
    def file_name(self) -> str:
        return f"{self.image_id}{self.ext}"


@dataclass(frozen=True)
class ModelVersionRecord:
    model: str
    version: str
    file_name: str  # e.g. "model.pt"
    sha256: str
    size: int
    metrics: dict[str, Any]
    info: dict[str, Any]
    create_time: datetime


@dataclass(frozen=True)
class ModelRecord:
    model: str
    latest_version: str | None
    pinned_version: str | None  # when set, inference serves this one instead of the latest

    @property
    def serving_version(self) -> str | None:
        return self.pinned_version or self.latest_version


@dataclass(frozen=True)
class LeaseRecord:
    image_id: str
    client_id: str
    strategy: str
    acquire_time: datetime
    expire_time: datetime


@dataclass(frozen=True)
class Record:
    """A small JSON document kept in the index: job records, train stats, scoring runs."""

    kind: str
    record_id: str
    data: dict[str, Any]
    revision: int
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class SessionRecord:
    """A MONAI Label session: one uploaded volume, kept until ``expire_time``."""

    session_id: str
    owner: str
    file_name: str
    ext: str
    sha256: str
    size: int
    meta: dict[str, Any]
    expiry_seconds: int  # lifetime after creation and after each touch
    create_time: datetime
    last_access_time: datetime
    expire_time: datetime  # last_access_time + expiry_seconds


@dataclass(frozen=True)
class DatastoreStatus:
    total: int  # number of images
    completed: int  # images with a "final" label
    label_tags: dict[str, int]  # tag -> number of labels


class ImageFilter(enum.Enum):
    ALL = "all"
    LABELED = "labeled"  # has a label with the given tag
    UNLABELED = "unlabeled"  # has no label with the given tag


class ImageOrder(enum.Enum):
    ID = "id"  # plain string order of ids, as MONAI Label sorts
    SCORE_DESC = "score_desc"  # highest score of a given key first
    RANDOM = "random"


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str  # "" on the last page
    total_size: int


@dataclass(frozen=True)
class ImageImport:
    """One image for ``bulk_import`` (what a reindex found in the store)."""

    image_id: str
    ext: str
    sha256: str
    size: int
    info: Mapping[str, Any]
    create_time: float | None = None  # epoch seconds; None = now


@dataclass(frozen=True)
class LabelImport:
    """One label for ``bulk_import``."""

    image_id: str
    tag: str
    ext: str
    sha256: str
    size: int
    info: Mapping[str, Any]
