"""A training job as the service stores and answers it (a `services.common.jobs.Job`)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from services.common.jobs import Job
from services.train.domain.running import Progress


class TrainingJob(Job):
    """One training run: what was asked, what it resolved to, and how far it got."""

    trainer: str = ""
    # MONAI Label's name for the trainer's model (the same name).
    model: str = ""
    description: str = ""
    # The params as the client gave them, and with the trainer's defaults filled in.
    params: dict[str, Any] = Field(default_factory=dict)
    resolved_params: dict[str, Any] = Field(default_factory=dict)
    # Devices asked for (none: any `device_count`), then the ones it runs on.
    devices: tuple[str, ...] = ()
    device_count: int = 0
    initial_model_version: str = ""
    progress: Progress | None = None
    # The last train_stats the child reported (MONAI Label's /train/stats).
    train_stats: dict[str, Any] = Field(default_factory=dict)
    # The newest model version the job published.
    model_version: str = ""
