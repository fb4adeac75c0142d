"""What the inference domain needs from the outside, as protocols the adapters implement.

The runner and volume protocols are shared with scoring: `services.common.models.ports`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from services.common.models.ports import ModelSource


class DatastorePort(ModelSource, Protocol):
    """The datastore, as the inference service uses it (async: it is a network service)."""

    async def download_image(self, image_id: str, dest_dir: Path) -> Path: ...

    async def download_session(self, session_id: str, dest_dir: Path) -> Path: ...

    async def download_label(self, image_id: str, tag: str, dest_dir: Path) -> Path: ...

    async def upload_label(self, image_id: str, tag: str, path: Path, file_name: str, info: dict[str, Any]) -> str: ...

    async def serving_version(self, model: str) -> str | None: ...

    async def list_versions(self, model: str) -> list[str]: ...

    async def download_model_version(self, model: str, version: str, dest_dir: Path) -> Path: ...

    async def renew_image_lease(self, image_id: str, client_id: str, ttl_seconds: int = 0) -> None: ...

    async def ping(self) -> bool: ...
