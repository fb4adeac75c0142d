"""Builds the active learning use cases from settings: the one place that picks the adapters."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import torch

from services.activelearning.adapters.datastore import DatastoreLeases
from services.activelearning.adapters.scorer import TorchScorer
from services.activelearning.domain.model import ScoringJob
from services.activelearning.domain.next_sample import NextSampler
from services.activelearning.domain.scoring import RECORD_KIND, ScoringJobs
from services.activelearning.settings import ActiveLearningSettings
from services.common.apps import load_app
from services.common.bundles import BundleModels
from services.common.datastore_client import DatastoreClient
from services.common.errors import LabelgridError
from services.common.jobs import JobStore
from services.common.models.devices import resolve_devices

log = logging.getLogger("labelgrid.activelearning")


class ActiveLearning:
    """The service's use cases and their background work (scoring runner, lease gauge)."""

    def __init__(self, settings: ActiveLearningSettings) -> None:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.app = load_app(settings.app)
        self.devices = resolve_devices(settings.device)
        self.datastore = DatastoreClient(
            settings.datastore, settings.datastore_timeout_seconds, token=settings.service_token
        )
        self.store = DatastoreLeases(self.datastore)
        work_dir = settings.work_dir.resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        self.scorer = TorchScorer(self.devices, self.datastore, work_dir, settings.model_cache_bytes)
        self.sampler = NextSampler(self.app, self.store, settings.lease_ttl_seconds, settings.label_tag)
        self.scoring = ScoringJobs(
            self.app,
            self.store,
            JobStore(self.datastore, RECORD_KIND, ScoringJob),
            self.scorer,
            work_dir,
            label_tag=settings.label_tag,
            auto_scoring_seconds=settings.auto_scoring_seconds,
            max_queued=settings.max_queued_scoring_jobs,
        )
        self.live_leases = 0
        self._gauge_task: asyncio.Task[None] | None = None
        # MONAI Bundles from the datastore, scored like the app's models (the --bundle paths are stored first).
        self.bundles = BundleModels(
            self.app, self.datastore, work_dir, settings.bundle, settings.bundle_check_seconds, with_trainers=False
        )

    async def start(self) -> None:
        """Takes over scoring jobs left by a previous process and starts the background work."""
        await self.bundles.start()
        await self.scoring.start(resume=self.settings.resume_scoring)
        self._gauge_task = asyncio.create_task(self._refresh_leases(), name="lease-gauge")

    async def _refresh_leases(self) -> None:
        while True:
            try:
                self.live_leases = await self.store.count_leases()
            except LabelgridError as error:
                log.debug("could not count leases", extra={"error": error.message})
            await asyncio.sleep(self.settings.lease_gauge_seconds)

    async def stop(self) -> None:
        await self.bundles.stop()
        if self._gauge_task is not None:
            self._gauge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauge_task
        await self.scoring.stop()
        self.scorer.close()
        await self.datastore.close()
