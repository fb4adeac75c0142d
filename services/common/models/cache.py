"""Loaded networks per (model, device): lazy, LRU-evicted over a byte budget, hot-reloaded.

Shared by inference and active learning scoring, so both load exactly the version the
datastore serves (the app's initial weights while none is published).

A model loads the first time a request needs it on a device (with a warm-up forward pass,
done by the runner). Before each request the served version is looked up in the datastore
(cached for `version_ttl` seconds, so a burst of requests costs one lookup); when training
published a newer one, its weights are downloaded and loaded, and the cache entry is
replaced. A request in flight holds its own reference, so it finishes on the old weights.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from services.common.models.ports import ModelRunner, ModelSource
from services.common.models.types import UNTRAINED, LoadedNetwork

log = logging.getLogger("labelgrid.infer.models")


class ServingVersions:
    """The version the datastore says to serve, per model, cached for `ttl` seconds."""

    def __init__(self, datastore: ModelSource, ttl: float):
        self.datastore = datastore
        self.ttl = ttl
        self._cache: dict[str, tuple[float, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, model: str) -> str:
        """The serving version, or UNTRAINED while nothing was published."""
        now = time.monotonic()
        cached = self._cache.get(model)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:
            cached = self._cache.get(model)
            if cached is not None and time.monotonic() - cached[0] < self.ttl:
                return cached[1]
            version = await self.datastore.serving_version(model) or UNTRAINED
            self._cache[model] = (time.monotonic(), version)
            return version

    def known(self, model: str) -> str | None:
        """The last version seen, without asking the datastore."""
        cached = self._cache.get(model)
        return cached[1] if cached else None


class ModelCache:
    """(model, device) -> LoadedNetwork, least recently used evicted first over `budget_bytes`."""

    def __init__(self, runner: ModelRunner, datastore: ModelSource, budget_bytes: int, work_dir: Path):
        self.runner = runner
        self.datastore = datastore
        self.budget_bytes = budget_bytes
        self.work_dir = work_dir
        self._entries: OrderedDict[tuple[str, str], LoadedNetwork] = OrderedDict()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._tasks: dict[tuple[str, str], Any] = {}
        self.load_count = 0

    def loaded(self, model: str) -> list[LoadedNetwork]:
        return [entry for (name, _device), entry in self._entries.items() if name == model]

    @property
    def used_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self._entries.values())

    async def get(
        self,
        model: str,
        task: Any,
        device: str,
        version: str,
        run_blocking: Callable[[Callable[[], LoadedNetwork]], Awaitable[LoadedNetwork]],
    ) -> LoadedNetwork:
        """The network of `version` on `device`, loading it (via `run_blocking`, on the device's pool) if needed."""
        key = (model, device)
        entry = self._entries.get(key)
        # Same version of the same task (a replaced bundle is a new task with the same version names).
        if entry is not None and entry.version == version and self._tasks.get(key) is task:
            self._entries.move_to_end(key)
            return entry
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._entries.get(key)
            if entry is not None and entry.version == version and self._tasks.get(key) is task:
                self._entries.move_to_end(key)
                return entry
            download_dir = Path(tempfile.mkdtemp(prefix=f"weights-{model}-", dir=self.work_dir))
            try:
                weights = None
                if version != UNTRAINED:
                    weights = await self.datastore.download_model_version(model, version, download_dir)
                loaded = await run_blocking(lambda: self.runner.load(task, device, weights, version))
            finally:
                shutil.rmtree(download_dir, ignore_errors=True)
            previous = self._entries.pop(key, None)
            self._entries[key] = loaded
            self._tasks[key] = task
            self.load_count += 1
            log.info(
                "model loaded",
                extra={
                    "model": model,
                    "device": device,
                    "version": version,
                    "replaced": previous.version if previous else None,
                    "bytes": loaded.size_bytes,
                    "seconds": round(loaded.load_seconds, 3),
                },
            )
            self._evict(keep=key)
            return loaded

    def _evict(self, keep: tuple[str, str]) -> None:
        """Drops least recently used networks until the budget holds (never the one just loaded)."""
        while self.used_bytes > self.budget_bytes and len(self._entries) > 1:
            key = next(iter(self._entries))
            if key == keep:
                self._entries.move_to_end(key)
                key = next(iter(self._entries))
            evicted = self._entries.pop(key)
            log.info("model evicted", extra={"model": key[0], "device": key[1], "version": evicted.version})
