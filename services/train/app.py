"""Builds the training use cases from settings: the one place that picks the adapters."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.apps import LoadedApp, load_app
from services.common.datastore_client import DatastoreClient
from services.common.jobs import JobStore
from services.common.models.devices import resolve_devices
from services.train.adapters.data import DataCache
from services.train.adapters.datastore import TrainingDatastore
from services.train.adapters.process import ProcessLauncher
from services.train.domain.devices import DevicePool
from services.train.domain.job import TrainingJob
from services.train.domain.training import JOB_KIND, Training
from services.train.settings import TrainSettings


@dataclass
class BuiltTraining:
    training: Training
    datastore: DatastoreClient
    cache: DataCache
    # The app whose trainers `training` runs (bundle trainers are added to it in place).
    app: LoadedApp


def build_training(settings: TrainSettings) -> BuiltTraining:
    """The use cases, the datastore client and the image cache (call `training.start()` on the serving loop)."""
    devices = resolve_devices(settings.device)
    app = load_app(settings.app)
    client = DatastoreClient(settings.datastore, settings.datastore_timeout_seconds, token=settings.service_token)
    work_dir = settings.work_dir.resolve()
    (work_dir / "cache").mkdir(parents=True, exist_ok=True)
    (work_dir / "jobs").mkdir(parents=True, exist_ok=True)
    cache = DataCache(client, work_dir / "cache", settings.cache_bytes)
    training = Training(
        trainers=app.trainers,
        store=JobStore(client, JOB_KIND, TrainingJob, progress_interval=settings.progress_interval_seconds),
        datastore=TrainingDatastore(client),
        data=cache,
        launcher=ProcessLauncher(),
        pool=DevicePool(devices, settings.cpu_slots),
        work_dir=work_dir,
        app_module=settings.app,
        queue_limit=settings.queue_limit,
        stop_grace_seconds=settings.stop_grace_seconds,
        torch_threads=settings.torch_threads,
        keep_job_dirs=settings.keep_job_dirs,
        why_not_trainable=lambda name: app.bundles[name].why_not_trainable if name in app.bundles else "",
    )
    return BuiltTraining(training, client, cache, app)
