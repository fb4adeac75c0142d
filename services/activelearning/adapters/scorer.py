"""Scoring with torch on the service's own device allowance.

Networks load and hot-reload exactly as inference loads them (the datastore's served
version, the app's seeded initial weights before any is published): the model cache, the
torch runner and the volume reader are the shared ones in `services.common.models`. All torch
work runs on one worker thread per scoring device, off the event loop, one image at a time.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from apps.api.activelearning import ScoringInput
from services.common.datastore_client import DatastoreClient
from services.common.models.cache import ModelCache
from services.common.models.torch_runner import TorchRunner
from services.common.models.volumes import VolumeFiles

T = TypeVar("T")


class TorchScorer:
    """`Scorer` on the first of `devices` (a scoring job is one image after another)."""

    def __init__(self, devices: list[str], datastore: DatastoreClient, work_dir: Path, cache_bytes: int) -> None:
        self.devices = list(devices)
        self.device = self.devices[0]
        self.runner = TorchRunner(self.devices, warm_up=False)
        self.cache = ModelCache(self.runner, datastore, cache_bytes, work_dir)
        self.volumes = VolumeFiles()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"scoring-{self.device}")

    async def _run(self, work: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def score(
        self, method: Any, task: Any, model: str, version: str, image: Path, label: Path | None, params: dict[str, Any]
    ) -> float:
        loaded = await self.cache.get(model, task, self.device, version, self._run)

        def work() -> float:
            volume = self.volumes.read(image, image.name)
            label_data = None
            if label is not None:
                label_data = self.volumes.read(label, label.name).data
            item = ScoringInput(volume.data, volume.affine, label_data, dict(params))
            value = float(method.score(task, loaded.network, self.device, item))
            if self.device.startswith("cuda"):
                torch.cuda.synchronize(torch.device(self.device))
            return value

        return await self._run(work)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
