"""Settings of the training service (env LABELGRID_*, or flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pydantic

from services.common.bundles import BundleSettings


class TrainSettings(BundleSettings):
    port: int = 50053
    # The datastore's gRPC address: labeled images come from there, model versions go there.
    datastore: str = "127.0.0.1:50051"
    # The app package (env LABELGRID_APP), loaded by dotted name; its trainers() are served.
    app: str = "apps.radiology"
    # auto (every visible GPU, else the CPU), cpu, cuda, cuda:N, or a comma list.
    device: str = "auto"
    # How many jobs (or DDP processes) may share the CPU when training runs on it.
    cpu_slots: Annotated[int, pydantic.Field(ge=1)] = 1
    # Jobs that may wait for devices before CreateTrainingJob answers QUEUE_FULL.
    queue_limit: Annotated[int, pydantic.Field(ge=0)] = 16
    # Job dirs (spec, events, checkpoints, logs) and the image cache (keyed by sha256).
    work_dir: Path = Path("var/train")
    # Bytes of cached images and labels kept before the least recently used are removed.
    cache_bytes: Annotated[int, pydantic.Field(ge=0)] = 20 * 1024**3
    # Timeout of each datastore call.
    datastore_timeout_seconds: Annotated[float, pydantic.Field(gt=0)] = 120.0
    # Progress reaches the datastore at most this often (state changes are written at once).
    progress_interval_seconds: Annotated[float, pydantic.Field(gt=0)] = 1.0
    # A stopped job gets this long after SIGTERM before its processes are killed.
    stop_grace_seconds: Annotated[float, pydantic.Field(ge=0)] = 3.0
    # torch intra-op threads per training process on the CPU; 0 splits the cores between processes.
    torch_threads: Annotated[int, pydantic.Field(ge=0)] = 0
    # Finished jobs' directories (checkpoints, logs) kept; older ones are removed.
    keep_job_dirs: Annotated[int, pydantic.Field(ge=0)] = 20
