"""What the training use cases need from the outside world (adapters implement these)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from services.train.domain.events import Event


class DatastorePort(Protocol):
    async def serving_version(self, model: str) -> str | None: ...

    async def download_model_version(self, model: str, version: str, dest_dir: Path) -> Path: ...

    async def upload_model_version(
        self, model: str, path: Path, *, metrics: dict[str, Any], info: dict[str, Any], version: str = ""
    ) -> Any: ...

    async def model_version_exists(self, model: str, version: str) -> bool: ...


class DataPort(Protocol):
    """The labeled images, fetched into a local cache."""

    async def labeled_datalist(self, tag: str, log: Callable[[str], None]) -> list[dict[str, str]]:
        """[{"image": path, "label": path, "image_id": id}] of every image with a `tag` label;
        its files stay until `release(datalist)`."""
        ...

    def release(self, datalist: list[dict[str, str]]) -> None:
        """The job given `datalist` has ended: its files may go."""
        ...


class ChildProcess(Protocol):
    pid: int

    async def wait(self) -> int: ...

    async def stop(self, grace_seconds: float) -> None: ...


class LauncherPort(Protocol):
    async def start(
        self,
        job_dir: Path,
        spec: dict[str, Any],
        devices: list[str],
        on_line: Callable[[str], None],
        on_event: Callable[[Event], None],
    ) -> ChildProcess: ...
