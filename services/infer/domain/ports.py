"""What the domain needs from the outside, as protocols the adapters implement."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

from apps.prompt import Prompt
from services.infer.domain.model import DeviceInfo, LoadedNetwork, RunResult, Volume


class DatastorePort(Protocol):
    """The datastore, as the inference service uses it (async: it is a network service)."""

    async def download_image(self, image_id: str, dest_dir: Path) -> Path: ...

    async def upload_label(self, image_id: str, tag: str, path: Path, file_name: str, info: dict[str, Any]) -> str: ...

    async def serving_version(self, model: str) -> str | None: ...

    async def list_versions(self, model: str) -> list[str]: ...

    async def download_model_version(self, model: str, version: str, dest_dir: Path) -> Path: ...

    async def ping(self) -> bool: ...


class VolumeIO(Protocol):
    """Reads images and writes labels (blocking: call off the event loop)."""

    def read(self, path: Path, file_name: str) -> Volume: ...

    def write_label(
        self, label: Any, affine: Any, dest_dir: Path, stem: str, extension: str, dtype: str, compress: bool
    ) -> Path: ...


class ModelRunner(Protocol):
    """Builds networks and runs tasks on a device (blocking torch work: call on the device's executor)."""

    def load(self, task: Any, device: str, weights: Path | None, version: str) -> LoadedNetwork: ...

    def run(
        self, task: Any, loaded: LoadedNetwork, volume: Volume, prompt: Prompt, params: dict[str, Any], cancelled: threading.Event
    ) -> RunResult: ...

    def devices(self) -> list[DeviceInfo]: ...
