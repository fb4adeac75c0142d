"""Settings of the inference service (env LABELGRID_*, or flags)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import pydantic

from services.common.bundles import BundleSettings
from services.common.models.batching import BatchPolicy


class InferSettings(BundleSettings):
    port: int = 50052
    # The datastore's gRPC address: images, labels and model weights all come from there.
    datastore: str = "127.0.0.1:50051"
    # The app package (env LABELGRID_APP), loaded by dotted name.
    app: str = "apps.radiology"
    # auto (every visible GPU, else the CPU), cpu, cuda, cuda:N, or a comma list.
    device: str = "auto"
    # Inferences running at once per device, and how many may wait before QUEUE_FULL.
    concurrency_per_device: Annotated[int, pydantic.Field(ge=1)] = 1
    queue_limit: Annotated[int, pydantic.Field(ge=0)] = 16
    # Bytes of loaded networks kept per process before the least recently used is dropped.
    model_cache_bytes: Annotated[int, pydantic.Field(ge=0)] = 4 * 1024**3
    # How long a served-version lookup is trusted before asking the datastore again.
    version_check_seconds: Annotated[float, pydantic.Field(ge=0)] = 1.5
    # Timeout of each datastore call.
    datastore_timeout_seconds: Annotated[float, pydantic.Field(gt=0)] = 120.0
    # Scratch space for downloaded images, weights and result files (removed after each request).
    work_dir: Path = Path("var/infer")
    max_upload_bytes: Annotated[int, pydantic.Field(ge=1)] = 2 * 1024**3
    # torch intra-op threads for CPU work; 0 leaves torch's default.
    torch_threads: Annotated[int, pydantic.Field(ge=0)] = 0
    # Run one forward pass when a model loads, so the first request does not pay for lazy init.
    warm_up: bool = True
    # gRPC target reaching every inference replica (e.g. dns:///labelgrid-inference-headless:50052):
    # batch inference sends its images there, round robin, to use all replicas' devices; empty:
    # this replica's devices only.
    batch_address: str = ""
    # Images of a batch in flight at once; 0: twice this replica's device slots (with
    # batch_address, set it to the slots of all replicas, times two).
    batch_width: Annotated[int, pydantic.Field(ge=0)] = 0
    # Batch inference jobs waiting to run (beyond the one running); one more is refused with
    # RESOURCE_EXHAUSTED (QUEUE_FULL), so clients cannot queue without bound.
    max_queued_batch_jobs: Annotated[int, pydantic.Field(ge=1, le=10_000)] = 32
    # Dynamic batching: sliding-window patches of concurrent requests of one model version on one
    # device run as one forward pass of at most max_batch_size patches; a forward waits at most
    # max_queue_delay_ms for the patches of other running requests. Unset: by device (CPU off,
    # i.e. 1 / 0, since a batch costs the sum of its patches there; GPU 8 / 5 ms). Requests run
    # together only with concurrency_per_device > 1. model_batching sets a model's own, as JSON:
    # {"segmentation": {"max_batch_size": 8, "max_queue_delay_ms": 5}}.
    max_batch_size: Annotated[int, pydantic.Field(ge=1)] | None = None
    max_queue_delay_ms: Annotated[float, pydantic.Field(ge=0, le=10_000)] | None = None
    model_batching: Annotated[dict[str, BatchPolicy], pydantic.Field(default_factory=dict)]

    @pydantic.field_validator("model_batching", mode="before")
    @classmethod
    def _model_batching_json(cls, value: Any) -> Any:
        """--model-batching comes as a JSON string (env vars are parsed by pydantic-settings)."""
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except ValueError as error:
                raise ValueError(f"model_batching must be JSON: {error}") from None
        return value
