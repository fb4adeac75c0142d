"""What this service instance holds of one job while it is queued or running.

One `RunningJob` per job, created when the job is queued and dropped when it ends: its
device request, the task that runs it, the child process, a stop request, the progress
last reported, the newest checkpoint waiting to be published, and every background task
it started (log lines, progress writes, the publisher). Background tasks are kept until
they end, and an exception they raise is logged, never lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from services.common.tasks import spawn
from services.train.domain.devices import DeviceRequest
from services.train.domain.events import Checkpoint, Completed, Epoch, Iteration
from services.train.domain.ports import ChildProcess


@dataclass
class Progress:
    """A running job's progress as the contract's TrainingProgress holds it."""

    epoch: int = 0
    total_epochs: int = 0
    iteration: int = 0
    total_iterations: int = 0
    loss: float = 0.0
    metric_name: str = ""
    metric: float = 0.0
    best_metric: float = 0.0
    best_metric_epoch: int = 0
    elapsed_seconds: float = 0.0
    estimated_remaining_seconds: float = 0.0


def iteration_progress(
    previous: Progress | None, event: Iteration, first_step: tuple[float, int], now: float
) -> Progress:
    """The progress after an iteration event; the ETA extrapolates the rate since `first_step` (time, iteration)."""
    total = event.epoch_length * event.max_epochs
    first_time, first_iteration = first_step
    remaining = 0.0
    if event.iteration > first_iteration and total:
        remaining = (now - first_time) / (event.iteration - first_iteration) * max(0, total - event.iteration)
    return dataclasses.replace(
        previous or Progress(),
        epoch=event.epoch,
        total_epochs=event.max_epochs,
        iteration=event.iteration,
        total_iterations=total,
        loss=event.loss or 0.0,
        elapsed_seconds=event.elapsed_seconds,
        estimated_remaining_seconds=remaining,
    )


def stats_progress(previous: Progress | None, event: Epoch | Completed) -> Progress:
    """The progress after an epoch's (or the run's final) train_stats: the evaluator's key metric, else the trainer's."""
    stats = event.stats
    evaluation = stats.get("eval") or stats.get("train") or {}
    key_metric = evaluation.get("key_metric_name")
    metric_name = event.metric_name if isinstance(event, Epoch) else ""
    metric = event.metric if isinstance(event, Epoch) else None
    progress = dataclasses.replace(
        previous or Progress(),
        epoch=int(stats.get("epoch", 0)),
        total_epochs=int(stats.get("total_epochs", 0)),
        iteration=int(stats.get("current_iteration", 0)),
        total_iterations=int(stats.get("total_iterations", 0)),
        metric_name=str(metric_name or key_metric or ""),
        metric=float(metric or (evaluation.get("metrics") or {}).get(key_metric) or 0.0),
        best_metric=float(evaluation.get("best_metric") or stats.get("best_metric") or 0.0),
        best_metric_epoch=int(evaluation.get("best_metric_epoch", 0) or 0),
    )
    if isinstance(event, Completed):
        progress.estimated_remaining_seconds = 0.0
    return progress


@dataclass(eq=False)
class RunningJob:
    job_id: str
    trainer: str
    device_request: DeviceRequest
    # The run, once the job has left the queue.
    task: asyncio.Task[None] | None = None
    # The child process, once started.
    proc: ChildProcess | None = None
    stop_requested: bool = False
    progress: Progress | None = None
    # (monotonic time, iteration) of the first step the child reported: the rate behind the ETA.
    first_step: tuple[float, int] | None = None
    # The newest improved checkpoint not yet published (older ones are skipped), and the task publishing.
    pending_checkpoint: Checkpoint | None = None
    publisher: asyncio.Task[None] | None = None
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        """A background task of this job (kept until it ends, its exception logged)."""
        return spawn(self.background, coro, f"training-job-{self.job_id}-{what}")

    async def settle(self) -> None:
        """Waits for the background tasks started so far (their failures are already logged)."""
        while self.background:
            await asyncio.gather(*list(self.background), return_exceptions=True)
