"""What the active learning domain needs from the outside, as protocols the adapters implement."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from services.activelearning.domain.model import Acquired, ImageEntry, Lease, LeasePage


class LeaseStore(Protocol):
    """The datastore's leases, scores and images (async: it is a network service)."""

    async def acquire(
        self, client_id: str, strategy: str, order: str, score_key: str, label_tag: str, ttl_seconds: int
    ) -> Acquired: ...

    async def renew(self, image_id: str, client_id: str, ttl_seconds: int) -> Lease: ...

    async def release(self, image_id: str, client_id: str) -> None: ...

    async def list_leases(self, client_id: str, page_size: int, page_token: str) -> LeasePage: ...

    async def count_leases(self) -> int: ...

    async def update_info(self, image_id: str, info: dict[str, Any]) -> None: ...

    async def set_score(self, image_id: str, key: str, value: float, model_version: str) -> None: ...

    async def images(self, labeled: bool, label_tag: str) -> list[ImageEntry]: ...

    async def download_image(self, image_id: str, dest_dir: Path) -> Path: ...

    async def download_label(self, image_id: str, tag: str, dest_dir: Path) -> Path: ...

    async def serving_version(self, model: str) -> str | None: ...


class Scorer(Protocol):
    """Runs a scoring method on one image file with a model version (torch, off the loop)."""

    devices: list[str]

    async def score(
        self, method: Any, task: Any, model: str, version: str, image: Path, label: Path | None, params: dict[str, Any]
    ) -> float: ...

    def close(self) -> None: ...
