"""The training use cases: validate a request, queue it, run it in a child process, publish.

Plain Python, no gRPC. Jobs are `TrainingJob`s in a `JobStore` (datastore records), so a
restarted service still lists them and marks the ones it lost as failed. The queue is
strict FIFO: the head waits until its devices are free, so a big job is never starved by
small ones. Each running job is one child process (torchrun above one device); its events
(progress, stats, improved checkpoints) come back through the launcher, and every
improved checkpoint is published to the datastore as a new model version, which
inference then serves.

The parts: `params` (validation), `events` (what the child reports), `running` (what this
instance holds per job), `publisher` (checkpoints to model versions); this module is the
queue and the run.
"""

from __future__ import annotations

import asyncio
import builtins  # `list` below is a method of Training: annotations after it name builtins.list
import contextlib
import logging
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import AlreadyExists, FailedPrecondition, LabelgridError, NotFound, ResourceExhausted
from services.common.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobError, JobState, JobStore
from services.train.domain import events
from services.train.domain.devices import DevicePool, DeviceRequest
from services.train.domain.job import TrainingJob
from services.train.domain.params import check_requested_epochs, resolve_params, split_datalist
from services.train.domain.ports import DataPort, DatastorePort, LauncherPort
from services.train.domain.publisher import CheckpointPublisher
from services.train.domain.running import Progress, RunningJob, iteration_progress, stats_progress

log = logging.getLogger("labelgrid.train")

JOB_KIND = "trainingJobs"
# MONAI Label's answer to a start while a job runs (its REST clients show this text).
ALREADY_RUNNING_MESSAGE = "++++++++++ Train Task is Already Running"
STATS_HEARTBEAT_SECONDS = 10.0
"""watch_train_stats reads and sends the stats at least this often: jobs another replica runs
are caught up, and the stream carries data between the clients' keepalive pings."""


class TrainFailed(LabelgridError):
    reason = "APP_TRAIN_FAILED"


@dataclass(frozen=True)
class TrainerInfo:
    name: str
    model: str
    description: str
    config: dict[str, Any]
    labels: dict[str, int]


@dataclass
class JobRequest:
    """What a client asks for (validated by `Training.create`)."""

    trainer: str
    params: dict[str, Any]
    devices: tuple[str, ...] = ()
    device_count: int = 0
    initial_model_version: str = ""
    enqueue: bool = False
    request_id: str = ""


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class Training:
    def __init__(
        self,
        *,
        trainers: dict[str, Any],
        store: JobStore[TrainingJob],
        datastore: DatastorePort,
        data: DataPort,
        launcher: LauncherPort,
        pool: DevicePool,
        work_dir: Path,
        app_module: str,
        queue_limit: int = 16,
        stop_grace_seconds: float = 3.0,
        torch_threads: int = 0,
        keep_job_dirs: int = 20,
        why_not_trainable: Callable[[str], str] = lambda name: "",
    ) -> None:
        self.trainers = trainers
        # Why a model that is served has no trainer (a bundle it cannot train), for a clear refusal.
        self.why_not_trainable = why_not_trainable
        self.store = store
        self.datastore = datastore
        self.data = data
        self.launcher = launcher
        self.pool = pool
        self.work_dir = work_dir
        self.app_module = app_module
        self.queue_limit = queue_limit
        self.stop_grace_seconds = stop_grace_seconds
        self.torch_threads = torch_threads
        self.keep_job_dirs = keep_job_dirs
        self.publisher = CheckpointPublisher(store, datastore)
        # The ids of the queued jobs in order, and every job this instance queued or runs.
        self._queue: list[str] = []
        self._jobs: dict[str, RunningJob] = {}
        self._create_lock = asyncio.Lock()
        # job_id -> (state, trainer) of every job known, for metrics; and per-trainer counters.
        self.states: dict[str, tuple[JobState, str]] = {}
        self.finished: dict[tuple[str, str], int] = {}
        # One event per open watch_train_stats stream: set when a trainer's stats may have changed.
        self._stats_watchers: set[asyncio.Event] = set()
        self._closing = False

    @property
    def published(self) -> dict[str, int]:
        """Model versions this process published, per trainer."""
        return self.publisher.published

    @property
    def last_progress(self) -> dict[str, Progress]:
        """The progress of every running job that has reported some."""
        return {job_id: job.progress for job_id, job in list(self._jobs.items()) if job.progress is not None}

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> builtins.list[TrainingJob]:
        """Marks jobs lost by a previous process FAILED; loads the job states for metrics."""
        lost = await self.store.recover("lost: the training service restarted while the job was queued or running")
        for job in await self.store.list():
            self.states[job.job_id] = (job.state, job.trainer)
        for job in lost:
            log.warning("job lost by a previous process marked failed", extra={"job": job.job_id})
        return lost

    def end_stats_watches(self) -> None:
        """Ends every watch_train_stats stream (the server is stopping)."""
        self._closing = True
        for changed in list(self._stats_watchers):
            changed.set()

    async def close(self) -> None:
        """Stops every running job (FAILED: the service stopped) and flushes progress."""
        self.end_stats_watches()
        # Take the whole queue first: a job ending while these are written would start the next.
        queued, self._queue[:] = list(self._queue), []
        for job_id in queued:
            self._jobs.pop(job_id, None)
            await self._finish(
                job_id,
                FAILED,
                JobError(reason="SERVER_ERROR", message="the training service stopped before the job ran"),
            )
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.flush()

    # -- trainers ----------------------------------------------------------------------------

    def trainer(self, name: str) -> Any:
        trainer = self.trainers.get(name)
        if trainer is None:
            why = self.why_not_trainable(name)
            if why:
                raise FailedPrecondition(f"model {name!r} cannot be trained here: {why}")
            known = ", ".join(self.trainers) or "none"
            raise NotFound(f"trainer {name!r} does not exist (this app has: {known})", reason="MODEL_NOT_FOUND")
        return trainer

    def list_trainers(self) -> list[TrainerInfo]:
        out = []
        for name, trainer in self.trainers.items():
            info = trainer.info()
            config = dict(info.get("config") or {})
            # MONAI Label shows the devices to pick from; ours are the service's.
            config["device"] = self.pool.names
            out.append(
                TrainerInfo(name, name, str(info.get("description", "")), config, dict(info.get("labels") or {}))
            )
        return out

    # -- params ------------------------------------------------------------------------------

    def resolve_params(self, trainer_name: str, given: dict[str, Any]) -> dict[str, Any]:
        """The trainer's config defaults (a choice's first option) overlaid by the request; INVALID_INPUT when malformed."""
        return resolve_params(dict(self.trainer(trainer_name).config), given)

    # -- use cases ---------------------------------------------------------------------------

    async def create(self, request: JobRequest) -> TrainingJob:
        trainer = self.trainer(request.trainer)
        given = dict(request.params)
        check_requested_epochs(given)
        params = self.resolve_params(request.trainer, given)
        device_request = DeviceRequest(tuple(request.devices), int(request.device_count))
        self.pool.check(device_request)
        if request.initial_model_version and not await self.datastore.model_version_exists(
            request.trainer, request.initial_model_version
        ):
            raise NotFound(
                f"version {request.initial_model_version!r} of model {request.trainer!r} does not exist",
                reason="MODEL_NOT_FOUND",
            )
        # One create at a time from the check to the queue: two at once must not both start.
        async with self._create_lock:
            if request.request_id:
                for existing in await self.store.list(where=lambda job: job.request_id == request.request_id):
                    return self._view(existing)
            active = [job_id for job_id, (state, _t) in self.states.items() if state in (QUEUED, RUNNING)]
            if active and not request.enqueue:
                raise AlreadyExists(ALREADY_RUNNING_MESSAGE, reason="ALREADY_RUNNING")
            if len(self._queue) >= self.queue_limit:
                raise ResourceExhausted(
                    f"the training queue is full ({self.queue_limit} jobs wait); retry later", reason="QUEUE_FULL"
                )
            new = TrainingJob(
                trainer=request.trainer,
                model=request.trainer,
                params=given,
                resolved_params=params,
                devices=tuple(request.devices),
                device_count=int(request.device_count),
                initial_model_version=request.initial_model_version,
                description=str(getattr(trainer, "description", "")),
            )
            new, created = await self.store.create(new, request.request_id)
            if created:
                self.states[new.job_id] = (QUEUED, request.trainer)
                self._queue.append(new.job_id)
                self._jobs[new.job_id] = RunningJob(new.job_id, request.trainer, device_request)
                self._dispatch()
        return self._view(await self.store.get(new.job_id))

    async def get(self, job_id: str) -> TrainingJob:
        return self._view(await self.store.get(job_id))

    async def list(self, state: str | None = None, trainer: str | None = None) -> builtins.list[TrainingJob]:
        where = (lambda job: job.trainer == trainer) if trainer else None
        return [self._view(job) for job in await self.store.list(state, where)]

    async def watch(self, job_id: str) -> AsyncIterator[TrainingJob]:
        async for job in self.store.watch(job_id):
            yield self._view(job)

    async def cancel(self, job_id: str) -> TrainingJob:
        """Stops a queued or running job and returns it CANCELLED; FAILED_PRECONDITION once it has ended."""
        stored = await self.store.get(job_id)
        if stored.state.final:
            raise FailedPrecondition(f"job {job_id} has already ended ({stored.state})")
        if job_id in self._queue:
            self._queue.remove(job_id)
            self._jobs.pop(job_id, None)
            await self._finish(job_id, CANCELLED, None)
            self._dispatch()
            return self._view(await self.store.get(job_id))
        job = self._jobs.get(job_id)
        if job is None or job.task is None:
            # Active in the datastore but not ours: another replica runs it.
            raise FailedPrecondition(f"job {job_id} is not run by this training service instance")
        job.stop_requested = True
        await self.store.log(job_id, "stop requested")
        if job.proc is not None:
            await job.proc.stop(self.stop_grace_seconds)
        await asyncio.wait({job.task}, timeout=self.stop_grace_seconds + 30)
        return self._view(await self.store.get(job_id))

    async def train_stats(self, trainer: str) -> tuple[dict[str, Any], str]:
        """(stats, job id) of the running job of `trainer`, else of the last one that has stats."""
        self.trainer(trainer)
        jobs = await self.store.list(where=lambda job: job.trainer == trainer)
        for job in [j for j in jobs if j.state == RUNNING] + jobs:
            if job.train_stats:
                return dict(job.train_stats), job.job_id
        return {}, ""

    async def all_train_stats(self) -> dict[str, dict[str, Any]]:
        """Every trainer's stats as train_stats answers them, from one listing of the jobs."""
        jobs = await self.store.list()
        out: dict[str, dict[str, Any]] = {}
        for trainer in self.trainers:
            mine = [job for job in jobs if job.trainer == trainer]
            found = next((job for job in [j for j in mine if j.state == RUNNING] + mine if job.train_stats), None)
            out[trainer] = dict(found.train_stats) if found is not None else {}
        return out

    async def watch_train_stats(self, heartbeat: float = STATS_HEARTBEAT_SECONDS) -> AsyncIterator[dict[str, Any]]:
        """Every trainer's stats now, then again after each change made by this process
        (an epoch's stats, a job's state) and at least every `heartbeat` seconds (read again
        from the datastore: jobs of another replica are caught up then). Ends when the
        service stops."""
        changed = asyncio.Event()
        self._stats_watchers.add(changed)
        try:
            while not self._closing:
                changed.clear()  # before reading: a change after this sets it again
                yield await self.all_train_stats()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), heartbeat)
        finally:
            self._stats_watchers.discard(changed)

    def _stats_changed(self) -> None:
        for changed in list(self._stats_watchers):
            changed.set()

    async def _update_stats(self, job_id: str, update: dict[str, Any]) -> None:
        await self.store.update(job_id, update)
        self._stats_changed()

    def queue_length(self) -> int:
        return len(self._queue)

    # -- views -------------------------------------------------------------------------------

    def _view(self, job: TrainingJob) -> TrainingJob:
        return job.at_position(self._queue.index(job.job_id) + 1 if job.job_id in self._queue else 0)

    # -- running -----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while self._queue:
            job = self._jobs[self._queue[0]]
            devices = self.pool.try_allocate(job.device_request)
            if devices is None:
                return
            self._queue.pop(0)
            job.task = asyncio.create_task(self._run(job, devices), name=f"training-job-{job.job_id}")

    async def _set_state(self, job_id: str, changes: dict[str, Any]) -> TrainingJob:
        job = await self.store.update(job_id, changes)
        self.states[job_id] = (job.state, job.trainer)
        self._stats_changed()  # a running job's stats win over the last finished one's
        return job

    async def _finish(self, job_id: str, state: JobState, error: JobError | None) -> None:
        job = await self._set_state(job_id, {"state": state, "error": error})
        key = (job.trainer, state)
        self.finished[key] = self.finished.get(key, 0) + 1
        log.info("job ended", extra={"job": job_id, "state": state, "error": error.message if error else None})

    async def _run(self, job: RunningJob, devices: builtins.list[str]) -> None:
        job_id = job.job_id
        job_dir = self.work_dir / "jobs" / job_id
        state: JobState = FAILED
        error: JobError | None = None
        datalist: builtins.list[dict[str, str]] = []
        try:
            current = await self.store.get(job_id)
            started = f"running on {', '.join(devices)}; fetching the labeled images"
            stored = await self._set_state(
                job_id, {"state": RUNNING, "devices": tuple(devices), "log_tail": (*current.log_tail, started)}
            )
            trainer = stored.trainer
            params = dict(stored.resolved_params)
            await asyncio.to_thread(job_dir.mkdir, parents=True, exist_ok=True)

            def job_log(line: str) -> None:
                job.spawn(self.store.log(job_id, line), "log")

            datalist = await self.data.labeled_datalist("final", job_log)
            if not datalist:
                raise TrainFailed("no labeled images: save a final label for at least one image before training")
            train_list, val_list = split_datalist(datalist, float(params.get("val_split") or 0.0))
            initial = await self._initial_weights(stored, params, job_dir)
            if job.stop_requested:
                state = CANCELLED
                return
            spec = {
                "app": self.app_module,
                "trainer": trainer,
                # A MONAI Bundle's trainer: the child builds it from the bundle's folder, not from the app.
                "bundle": getattr(self.trainers.get(trainer), "bundle_root", None),
                "params": params,
                "train_datalist": train_list,
                "val_datalist": val_list,
                "initial_weights": str(initial) if initial else None,
                "output_dir": str(job_dir / "checkpoints"),
                "events": str(job_dir / "events.jsonl"),
                "devices": devices,
                "torch_threads": self.torch_threads,
                "seed": 0,
            }
            lines: list[str] = []

            def on_line(line: str) -> None:
                lines.append(line)
                del lines[:-5]
                job.spawn(self.store.log(job_id, line), "log")

            job.proc = await self.launcher.start(
                job_dir, spec, devices, on_line, lambda event: self._on_event(job, event)
            )
            await self.store.log(job_id, f"training process started (pid {job.proc.pid})")
            if job.stop_requested:  # a stop came while the child was being started
                await job.proc.stop(self.stop_grace_seconds)
            code = await job.proc.wait()
            await self.publisher.drain(job)
            job.progress = None
            if job.stop_requested:
                state = CANCELLED
            elif code == 0:
                state = SUCCEEDED
            else:
                error = JobError(reason="APP_TRAIN_FAILED", message=f"the training process {_exit_reason(code, lines)}")
        except asyncio.CancelledError:
            if job.proc is not None:
                await job.proc.stop(0)
            state, error = (
                FAILED,
                JobError(reason="SERVER_ERROR", message="the training service stopped while the job ran"),
            )
            raise
        except LabelgridError as err:
            state, error = (
                (CANCELLED, None) if job.stop_requested else (FAILED, JobError(reason=err.reason, message=err.message))
            )
        except Exception as err:
            log.exception("training job failed", extra={"job": job_id})
            state, error = FAILED, JobError(reason="APP_TRAIN_FAILED", message=f"{type(err).__name__}: {err}")
        finally:
            job.proc = None
            job.progress = None
            self.pool.release(devices)
            self.data.release(datalist)
            try:
                await asyncio.shield(self._end(job, state, error))
            finally:
                self._jobs.pop(job_id, None)
                self._dispatch()
                self._prune_job_dirs()

    async def _end(self, job: RunningJob, state: JobState, error: JobError | None) -> None:
        # The job's last log lines and progress land before its final state.
        await job.settle()
        await self._finish(job.job_id, state, error)

    async def _initial_weights(self, stored: TrainingJob, params: dict[str, Any], job_dir: Path) -> Path | None:
        trainer, version = stored.trainer, stored.initial_model_version
        if not version and params.get("pretrained", True):
            version = await self.datastore.serving_version(trainer) or ""
        if not version:
            return None
        target = job_dir / "initial"
        await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
        path = await self.datastore.download_model_version(trainer, version, target)
        await self.store.log(stored.job_id, f"starting from version {version} of {trainer}")
        return path

    def _prune_job_dirs(self) -> None:
        root = self.work_dir / "jobs"
        if not root.is_dir():
            return
        active = {job_id for job_id, job in self._jobs.items() if job.task is not None}
        dirs = sorted(
            (p for p in root.iterdir() if p.is_dir() and p.name not in active), key=lambda p: p.stat().st_mtime
        )
        for path in dirs[: max(0, len(dirs) - self.keep_job_dirs)]:
            shutil.rmtree(path, ignore_errors=True)

    # -- events from the child ---------------------------------------------------------------

    def _on_event(self, job: RunningJob, event: events.Event) -> None:
        job_id = job.job_id
        if isinstance(event, events.Iteration):
            now = time.monotonic()
            if job.first_step is None:
                job.first_step = (now, event.iteration)
            job.progress = iteration_progress(job.progress, event, job.first_step, now)
            job.spawn(self.store.update(job_id, {"progress": job.progress}, persist=False), "progress")
        elif isinstance(event, (events.Epoch, events.Completed)):
            job.progress = stats_progress(job.progress, event)
            update = {"progress": job.progress, "train_stats": dict(event.stats)}
            job.spawn(self._update_stats(job_id, update), "stats")
        elif isinstance(event, events.Checkpoint):
            self.publisher.offer(job, event)
        elif isinstance(event, events.Started):
            line = f"training on {event.train_items} image(s), validating on {event.val_items}"
            job.spawn(self.store.log(job_id, line), "log")


def _exit_reason(code: int, lines: list[str]) -> str:
    """Why the child ended with exit status `code`, with the last line it printed."""
    why = f"killed by {_signal_name(code)}" if code < 0 else f"exited with code {code}"
    if code == -signal.SIGKILL:
        why += " (out of memory, or killed)"
    last = next((line for line in reversed(lines) if line.strip()), "")
    return why + (f": {last}" if last else "")
