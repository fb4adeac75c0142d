"""Builds the inference use cases from settings: the one place that picks the adapters."""

from __future__ import annotations

import torch

from services.common.apps import load_app
from services.common.datastore_client import DatastoreClient
from services.common.models.batching import BatchPolicies
from services.common.models.cache import ModelCache, ServingVersions
from services.common.models.devices import resolve_devices
from services.common.models.torch_runner import TorchRunner
from services.common.models.volumes import VolumeFiles
from services.infer.domain.inference import Inference
from services.infer.domain.scheduler import Scheduler
from services.infer.settings import InferSettings


def build_inference(settings: InferSettings) -> tuple[Inference, DatastoreClient]:
    """The use cases and the datastore client (the caller closes both)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    devices = resolve_devices(settings.device)
    app = load_app(settings.app)
    datastore = DatastoreClient(settings.datastore, settings.datastore_timeout_seconds, token=settings.service_token)
    batching = BatchPolicies(settings.max_batch_size, settings.max_queue_delay_ms, settings.model_batching)
    runner = TorchRunner(devices, warm_up=settings.warm_up, batching=batching)
    work_dir = settings.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    inference = Inference(
        app=app,
        datastore=datastore,
        runner=runner,
        volumes=VolumeFiles(),
        scheduler=Scheduler(devices, settings.concurrency_per_device, settings.queue_limit),
        cache=ModelCache(runner, datastore, settings.model_cache_bytes, work_dir),
        versions=ServingVersions(datastore, settings.version_check_seconds),
        work_dir=work_dir,
    )
    return inference, datastore
