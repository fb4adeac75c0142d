"""Publishes a job's improved checkpoints to the datastore as model versions (which inference serves).

Checkpoints are published one at a time per job, newest first: while one uploads, a newer
one replaces any still waiting, and every checkpoint older than the one just handled is
deleted from the job's folder.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.common.errors import LabelgridError
from services.common.jobs import JobStore
from services.train.domain.events import Checkpoint
from services.train.domain.job import TrainingJob
from services.train.domain.ports import DatastorePort
from services.train.domain.running import RunningJob


class CheckpointPublisher:
    def __init__(self, store: JobStore[TrainingJob], datastore: DatastorePort) -> None:
        self.store = store
        self.datastore = datastore
        # Model versions published by this process, per trainer (for metrics).
        self.published: dict[str, int] = {}

    def offer(self, job: RunningJob, checkpoint: Checkpoint) -> None:
        """Queues `checkpoint` (replacing one still waiting) and starts publishing unless already at it."""
        job.pending_checkpoint = checkpoint
        if job.publisher is None or job.publisher.done():
            job.publisher = job.spawn(self._publish_loop(job), "publish")

    async def drain(self, job: RunningJob) -> None:
        """Waits until every checkpoint offered so far is handled (call once the child has ended)."""
        # Let the event tailer deliver the last events, then wait for the uploads they caused.
        await asyncio.sleep(0)
        task, job.publisher = job.publisher, None
        if job.pending_checkpoint is not None and (task is None or task.done()):
            task = job.spawn(self._publish_loop(job), "publish")
        if task is not None:
            await task

    async def _publish_loop(self, job: RunningJob) -> None:
        while job.pending_checkpoint is not None:
            checkpoint, job.pending_checkpoint = job.pending_checkpoint, None
            await self._publish(job, checkpoint)

    async def _publish(self, job: RunningJob, checkpoint: Checkpoint) -> None:
        trainer = job.trainer
        path = Path(checkpoint.path)
        try:
            stored = await self.store.get(job.job_id)
            metrics = {
                "best_metric": checkpoint.metric,
                "best_metric_epoch": checkpoint.epoch,
                "key_metric_name": checkpoint.metric_name,
            }
            version = await self.datastore.upload_model_version(
                trainer,
                path,
                metrics=metrics,
                info={
                    "training_job": f"trainingJobs/{job.job_id}",
                    "trainer": trainer,
                    "params": stored.resolved_params,
                },
            )
            name = getattr(version, "name", "") or f"models/{trainer}/versions/{getattr(version, 'version', '')}"
            self.published[trainer] = self.published.get(trainer, 0) + 1
            await self.store.update(job.job_id, {"model_version": name})
            await self.store.log(
                job.job_id,
                f"New Model published: {name} ({checkpoint.metric_name} {checkpoint.metric:.4f} at epoch {checkpoint.epoch})",
            )
        except LabelgridError as err:
            await self.store.log(
                job.job_id, f"publishing the checkpoint of epoch {checkpoint.epoch} failed: {err.message}"
            )
        finally:
            await asyncio.to_thread(_remove_older_checkpoints, path)


def _remove_older_checkpoints(path: Path) -> None:
    for other in path.parent.glob("model_epoch*.pt"):
        if other.name < path.name:
            other.unlink(missing_ok=True)
