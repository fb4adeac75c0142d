"""What the shared model code needs from the outside, as protocols the adapters implement.

Shared by inference and scoring: each service's datastore port extends `ModelSource`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

from apps.api.prompt import Prompt
from services.common.models.types import DeviceInfo, LoadedNetwork, RunResult, Volume


class ModelSource(Protocol):
    """Where published model versions come from: the datastore (async: it is a network service)."""

    async def serving_version(self, model: str) -> str | None: ...

    async def download_model_version(self, model: str, version: str, dest_dir: Path) -> Path: ...


class VolumeIO(Protocol):
    """Reads images and writes labels (blocking: call off the event loop)."""

    def read(self, path: Path, file_name: str, header_only: bool = False) -> Volume: ...

    def write_label(
        self, label: Any, affine: Any, dest_dir: Path, stem: str, extension: str, dtype: str, compress: bool
    ) -> Path: ...


class ModelRunner(Protocol):
    """Builds networks and runs tasks on a device (blocking torch work: call on the device's executor)."""

    def load(self, task: Any, device: str, weights: Path | None, version: str) -> LoadedNetwork: ...

    def run(
        self,
        task: Any,
        loaded: LoadedNetwork,
        volume: Volume,
        prompt: Prompt,
        params: dict[str, Any],
        cancelled: threading.Event,
        input_label: Any = None,
        model: str = "",
    ) -> RunResult: ...

    def devices(self) -> list[DeviceInfo]: ...
