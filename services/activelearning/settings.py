"""Settings of the active learning service (env LABELGRID_*, or flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pydantic

from services.common.bundles import BundleSettings


class ActiveLearningSettings(BundleSettings):
    port: int = 50054
    # The datastore's gRPC address: images, leases, scores and model weights all live there.
    datastore: str = "127.0.0.1:50051"
    # The app package (env LABELGRID_APP), loaded by dotted name: its strategies and scoring methods.
    app: str = "apps.radiology"
    # Where scoring runs: auto (the first visible GPU, else the CPU), cpu, cuda or cuda:N.
    device: str = "auto"
    # Lifetime of a next-sample lease when the request names none (seconds).
    lease_ttl_seconds: Annotated[int, pydantic.Field(gt=0)] = 1800
    # Tag whose labels make an image "labeled" when a strategy does not say otherwise.
    label_tag: str = "final"
    # Timeout of each datastore call.
    datastore_timeout_seconds: Annotated[float, pydantic.Field(gt=0)] = 120.0
    # Scratch space for downloaded images and weights (removed after each image).
    work_dir: Path = Path("var/activelearning")
    # torch intra-op threads for CPU scoring; 0 leaves torch's default. Scoring is a
    # background job: keep it from starving inference on a shared host.
    torch_threads: Annotated[int, pydantic.Field(ge=0)] = 0
    # Bytes of loaded networks kept for scoring.
    model_cache_bytes: Annotated[int, pydantic.Field(ge=0)] = 1024**3
    # Scoring jobs a previous process left queued or running are queued again (they skip
    # what they already scored); with --no-resume-scoring they are marked FAILED.
    resume_scoring: bool = True
    # Scoring jobs waiting to run (beyond the one running); one more is refused with
    # RESOURCE_EXHAUSTED (QUEUE_FULL), so clients cannot queue without bound.
    max_queued_scoring_jobs: Annotated[int, pydantic.Field(ge=1, le=10_000)] = 32
    # Score on start and whenever a scoring method's model gets a new served version
    # (MONAI Label's auto scoring); checked every this many seconds, 0 turns it off.
    auto_scoring_seconds: Annotated[float, pydantic.Field(ge=0)] = 0.0
    # How often the live-lease gauge is refreshed from the datastore (seconds).
    lease_gauge_seconds: Annotated[float, pydantic.Field(gt=0)] = 15.0
