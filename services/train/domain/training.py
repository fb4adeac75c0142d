"""The training use cases: validate a request, queue it, run it in a child process, publish.

Plain Python, no gRPC. Jobs are documents in a `JobStore` (datastore records), so a
restarted service still lists them and marks the ones it lost as failed. The queue is
strict FIFO: the head waits until its devices are free, so a big job is never starved by
small ones. Each running job is one child process (torchrun above one device); its events
(progress, stats, improved checkpoints) come back through the launcher, and every
improved checkpoint is published to the datastore as a new model version, which
inference then serves.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, LabelgridError, NotFound, ResourceExhausted
from services.common.jobs import CANCELLED, FAILED, FINAL_STATES, QUEUED, RUNNING, SUCCEEDED, JobStore, new_job
from services.train.domain.devices import DevicePool, DeviceRequest
from services.train.domain.ports import ChildProcess, DataPort, DatastorePort, LauncherPort

log = logging.getLogger("labelgrid.train")

JOB_KIND = "trainingJobs"
# Typed params and the trainer config keys they stand for.
TYPED_PARAMS = (
    "max_epochs", "val_split", "learning_rate", "train_batch_size", "val_batch_size", "amp", "pretrained",
    "early_stop_patience",
)  # fmt: skip
# The contract holds these params (and progress epochs) as int32.
INT32_MAX = 2**31 - 1


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


def _check_number(params: dict[str, Any], key: str, kind: type, low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> None:
    if key not in params or params[key] is None:
        return
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise InvalidArgument(f"{key} must be a number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise InvalidArgument(f"{key} must be a whole number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise InvalidArgument(f"{key} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise InvalidArgument(f"{key} must be {'<' if high_open else '<='} {high}, got {value!r}")
    params[key] = kind(value)


class Training:
    def __init__(
        self,
        *,
        trainers: dict[str, Any],
        store: JobStore,
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
    ) -> None:
        self.trainers = trainers
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
        self._queue: list[str] = []
        self._create_lock = asyncio.Lock()
        self._requests: dict[str, DeviceRequest] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._procs: dict[str, ChildProcess] = {}
        self._cancel: set[str] = set()
        self._publishers: dict[str, asyncio.Task[None]] = {}
        self._pending_checkpoint: dict[str, dict[str, Any]] = {}
        self._first_step: dict[str, tuple[float, int]] = {}
        # job_id -> (state, trainer) of every job known, for metrics; and per-trainer counters.
        self.states: dict[str, tuple[str, str]] = {}
        self.published: dict[str, int] = {}
        self.finished: dict[tuple[str, str], int] = {}
        self.last_progress: dict[str, dict[str, Any]] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> list[dict[str, Any]]:
        """Marks jobs lost by a previous process FAILED; loads the job states for metrics."""
        lost = await self.store.recover("lost: the training service restarted while the job was queued or running")
        for doc in await self.store.list():
            self.states[doc["job_id"]] = (doc.get("state", ""), str(doc.get("trainer", "")))
        for doc in lost:
            log.warning("job lost by a previous process marked failed", extra={"job": doc["job_id"]})
        return lost

    async def close(self) -> None:
        """Stops every running job (FAILED: the service stopped) and flushes progress."""
        # Take the whole queue first: a job ending while these are written would start the next.
        queued, self._queue[:] = list(self._queue), []
        for job_id in queued:
            self._requests.pop(job_id, None)
            await self._finish(job_id, FAILED, {"reason": "SERVER_ERROR", "message": "the training service stopped before the job ran"})
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.flush()

    # -- trainers ----------------------------------------------------------------------------

    def trainer(self, name: str) -> Any:
        trainer = self.trainers.get(name)
        if trainer is None:
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
            out.append(TrainerInfo(name, name, str(info.get("description", "")), config, dict(info.get("labels") or {})))
        return out

    # -- params ------------------------------------------------------------------------------

    def resolve_params(self, trainer_name: str, given: dict[str, Any]) -> dict[str, Any]:
        """The trainer's config defaults (a choice's first option) overlaid by the request; INVALID_INPUT when malformed."""
        trainer = self.trainer(trainer_name)
        config = dict(trainer.config)
        params: dict[str, Any] = {k: (v[0] if isinstance(v, list) and v else v) for k, v in config.items()}
        for key, value in given.items():
            if value is None:
                continue
            default = config.get(key)
            if isinstance(default, list) and default and isinstance(value, str) and value not in default:
                raise InvalidArgument(f"{key} must be one of {', '.join(map(str, default))}, got {value!r}")
            params[key] = value
        _check_number(params, "max_epochs", int, 1, INT32_MAX)
        _check_number(params, "val_split", float, 0.0, 1.0, high_open=True)
        _check_number(params, "learning_rate", float, 0.0, None, low_open=True)
        _check_number(params, "train_batch_size", int, 1, INT32_MAX)
        _check_number(params, "val_batch_size", int, 1, INT32_MAX)
        _check_number(params, "early_stop_patience", int, -1, INT32_MAX)
        if "num_samples" in config:
            _check_number(params, "num_samples", int, 1, 64)
        for key in ("amp", "pretrained"):
            if key in params and not isinstance(params[key], bool):
                raise InvalidArgument(f"{key} must be true or false, got {params[key]!r}")
        return params

    # -- use cases ---------------------------------------------------------------------------

    async def create(self, request: JobRequest) -> dict[str, Any]:
        trainer = self.trainer(request.trainer)
        given = dict(request.params)
        if "max_epochs" in given and isinstance(given["max_epochs"], (int, float)) and given["max_epochs"] <= 0 and not isinstance(given["max_epochs"], bool):
            raise InvalidArgument(f"max_epochs must be a positive number of epochs, got {given['max_epochs']!r}")
        params = self.resolve_params(request.trainer, given)
        device_request = DeviceRequest(tuple(request.devices), int(request.device_count))
        self.pool.check(device_request)
        if request.initial_model_version:
            if not await self.datastore.model_version_exists(request.trainer, request.initial_model_version):
                raise NotFound(
                    f"version {request.initial_model_version!r} of model {request.trainer!r} does not exist",
                    reason="MODEL_NOT_FOUND",
                )
        # One create at a time from the check to the queue: two at once must not both start.
        async with self._create_lock:
            if request.request_id:
                for existing in await self.store.list(where=lambda d: d.get("request_id") == request.request_id):
                    return self._view(existing)
            active = [job_id for job_id, (state, _t) in self.states.items() if state in (QUEUED, RUNNING)]
            if active and not request.enqueue:
                raise AlreadyExists("++++++++++ Train Task is Already Running", reason="ALREADY_RUNNING")
            if len(self._queue) >= self.queue_limit:
                raise ResourceExhausted(f"the training queue is full ({self.queue_limit} jobs wait); retry later", reason="QUEUE_FULL")
            doc = new_job(
                trainer=request.trainer,
                model=request.trainer,
                params=given,
                resolved_params=params,
                devices=list(request.devices),
                device_count=int(request.device_count),
                initial_model_version=request.initial_model_version,
                progress=None,
                train_stats={},
                model_version="",
                description=str(getattr(trainer, "description", "")),
            )
            doc, created = await self.store.create(doc, request.request_id)
            if created:
                self.states[doc["job_id"]] = (QUEUED, request.trainer)
                self._queue.append(doc["job_id"])
                self._requests[doc["job_id"]] = device_request
                self._dispatch()
        return self._view(await self.store.get(doc["job_id"]))

    async def get(self, job_id: str) -> dict[str, Any]:
        return self._view(await self.store.get(job_id))

    async def list(self, state: str | None = None, trainer: str | None = None) -> list[dict[str, Any]]:
        where = (lambda d: d.get("trainer") == trainer) if trainer else None
        return [self._view(doc) for doc in await self.store.list(state, where)]

    async def watch(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        async for doc in self.store.watch(job_id):
            yield self._view(doc)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Stops a queued or running job and returns it CANCELLED; FAILED_PRECONDITION once it has ended."""
        doc = await self.store.get(job_id)
        if doc.get("state") in FINAL_STATES:
            raise FailedPrecondition(f"job {job_id} has already ended ({doc.get('state')})")
        if job_id in self._queue:
            self._queue.remove(job_id)
            self._requests.pop(job_id, None)
            await self._finish(job_id, CANCELLED, None)
            self._dispatch()
            return self._view(await self.store.get(job_id))
        task = self._tasks.get(job_id)
        if task is None:
            # Active in the datastore but not ours: another replica runs it.
            raise FailedPrecondition(f"job {job_id} is not run by this training service instance")
        self._cancel.add(job_id)
        await self.store.log(job_id, "stop requested")
        proc = self._procs.get(job_id)
        if proc is not None:
            await proc.stop(self.stop_grace_seconds)
        await asyncio.wait({task}, timeout=self.stop_grace_seconds + 30)
        return self._view(await self.store.get(job_id))

    async def train_stats(self, trainer: str) -> tuple[dict[str, Any], str]:
        """(stats, job id) of the running job of `trainer`, else of the last one that has stats."""
        self.trainer(trainer)
        jobs = await self.store.list(where=lambda d: d.get("trainer") == trainer)
        for doc in [d for d in jobs if d.get("state") == RUNNING] + jobs:
            if doc.get("train_stats"):
                return dict(doc["train_stats"]), doc["job_id"]
        return {}, ""

    def queue_length(self) -> int:
        return len(self._queue)

    # -- views -------------------------------------------------------------------------------

    def _view(self, doc: dict[str, Any]) -> dict[str, Any]:
        out = dict(doc)
        out["queue_position"] = self._queue.index(doc["job_id"]) + 1 if doc["job_id"] in self._queue else 0
        return out

    # -- running -----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while self._queue:
            job_id = self._queue[0]
            devices = self.pool.try_allocate(self._requests[job_id])
            if devices is None:
                return
            self._queue.pop(0)
            self._requests.pop(job_id, None)
            self._tasks[job_id] = asyncio.create_task(self._run(job_id, devices), name=f"training-job-{job_id}")

    async def _set_state(self, job_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        doc = await self.store.update(job_id, changes)
        self.states[job_id] = (doc.get("state", ""), str(doc.get("trainer", "")))
        return doc

    async def _finish(self, job_id: str, state: str, error: dict[str, str] | None, extra: dict[str, Any] | None = None) -> None:
        doc = await self._set_state(job_id, {"state": state, "error": error, **(extra or {})})
        key = (str(doc.get("trainer", "")), state)
        self.finished[key] = self.finished.get(key, 0) + 1
        log.info("job ended", extra={"job": job_id, "state": state, "error": (error or {}).get("message")})

    async def _run(self, job_id: str, devices: list[str]) -> None:
        job_dir = self.work_dir / "jobs" / job_id
        state, error = FAILED, None
        try:
            current = await self.store.get(job_id)
            started = f"running on {', '.join(devices)}; fetching the labeled images"
            doc = await self._set_state(
                job_id, {"state": RUNNING, "devices": devices, "log_tail": [*(current.get("log_tail") or []), started]}
            )
            trainer = str(doc["trainer"])
            params = dict(doc["resolved_params"])
            await asyncio.to_thread(job_dir.mkdir, parents=True, exist_ok=True)

            def job_log(line: str) -> None:
                asyncio.get_running_loop().create_task(self.store.log(job_id, line))

            datalist = await self.data.labeled_datalist("final", job_log)
            if not datalist:
                raise TrainFailed("no labeled images: save a final label for at least one image before training")
            train_list, val_list = _split(datalist, float(params.get("val_split") or 0.0))
            initial = await self._initial_weights(trainer, doc, params, job_dir)
            if job_id in self._cancel:
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
                asyncio.get_running_loop().create_task(self.store.log(job_id, line))

            proc = await self.launcher.start(job_dir, spec, devices, on_line, lambda event: self._on_event(job_id, trainer, event))
            self._procs[job_id] = proc
            await self.store.log(job_id, f"training process started (pid {proc.pid})")
            if job_id in self._cancel:  # a stop came while the child was being started
                await proc.stop(self.stop_grace_seconds)
            code = await proc.wait()
            await self._drain_publisher(job_id)
            if job_id in self._cancel:
                state = CANCELLED
            elif code == 0:
                state = SUCCEEDED
            else:
                why = f"killed by {_signal_name(code)}" if code < 0 else f"exited with code {code}"
                if code == -signal.SIGKILL:
                    why += " (out of memory, or killed)"
                last = next((line for line in reversed(lines) if line.strip()), "")
                error = {"reason": "APP_TRAIN_FAILED", "message": f"the training process {why}" + (f": {last}" if last else "")}
        except asyncio.CancelledError:
            proc = self._procs.get(job_id)
            if proc is not None:
                await proc.stop(0)
            state, error = FAILED, {"reason": "SERVER_ERROR", "message": "the training service stopped while the job ran"}
            raise
        except LabelgridError as err:
            state, error = (CANCELLED, None) if job_id in self._cancel else (FAILED, {"reason": err.reason, "message": err.message})
        except Exception as err:  # noqa: BLE001 - a job's failure must never take the service down
            log.exception("training job failed", extra={"job": job_id})
            state, error = FAILED, {"reason": "APP_TRAIN_FAILED", "message": f"{type(err).__name__}: {err}"}
        finally:
            self._procs.pop(job_id, None)
            self.pool.release(devices)
            self._cancel.discard(job_id)
            self._first_step.pop(job_id, None)
            try:
                await asyncio.shield(self._finish(job_id, state, error))
            finally:
                self._tasks.pop(job_id, None)
                self._dispatch()
                self._prune_job_dirs()

    async def _initial_weights(self, trainer: str, doc: dict[str, Any], params: dict[str, Any], job_dir: Path) -> Path | None:
        version = str(doc.get("initial_model_version") or "")
        if not version and params.get("pretrained", True):
            version = await self.datastore.serving_version(trainer) or ""
        if not version:
            return None
        target = job_dir / "initial"
        await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
        path = await self.datastore.download_model_version(trainer, version, target)
        await self.store.log(doc["job_id"], f"starting from version {version} of {trainer}")
        return path

    def _prune_job_dirs(self) -> None:
        root = self.work_dir / "jobs"
        if not root.is_dir():
            return
        active = set(self._tasks)
        dirs = sorted((p for p in root.iterdir() if p.is_dir() and p.name not in active), key=lambda p: p.stat().st_mtime)
        for path in dirs[: max(0, len(dirs) - self.keep_job_dirs)]:
            shutil.rmtree(path, ignore_errors=True)

    # -- events from the child ---------------------------------------------------------------

    def _on_event(self, job_id: str, trainer: str, event: dict[str, Any]) -> None:
        kind = event.get("type")
        loop = asyncio.get_running_loop()
        if kind == "iteration":
            iteration = int(event.get("iteration", 0))
            epoch_length = int(event.get("epoch_length", 0))
            total = epoch_length * int(event.get("max_epochs", 0))
            now = time.monotonic()
            first = self._first_step.setdefault(job_id, (now, iteration))
            remaining = 0.0
            if iteration > first[1] and total:
                remaining = (now - first[0]) / (iteration - first[1]) * max(0, total - iteration)
            progress = {
                **(self.last_progress.get(job_id) or {}),
                "epoch": int(event.get("epoch", 0)),
                "total_epochs": int(event.get("max_epochs", 0)),
                "iteration": iteration,
                "total_iterations": total,
                "loss": float(event.get("loss") or 0.0),
                "elapsed_seconds": float(event.get("elapsed_seconds", 0.0)),
                "estimated_remaining_seconds": remaining,
            }
            self.last_progress[job_id] = progress
            loop.create_task(self.store.update(job_id, {"progress": progress}, persist=False))
        elif kind in ("epoch", "completed"):
            stats = dict(event.get("stats") or {})
            evaluation = stats.get("eval") or stats.get("train") or {}
            progress = {
                **(self.last_progress.get(job_id) or {}),
                "epoch": int(stats.get("epoch", 0)),
                "total_epochs": int(stats.get("total_epochs", 0)),
                "iteration": int(stats.get("current_iteration", 0)),
                "total_iterations": int(stats.get("total_iterations", 0)),
                "metric_name": str(event.get("metric_name") or evaluation.get("key_metric_name") or ""),
                "metric": float(event.get("metric") or (evaluation.get("metrics") or {}).get(evaluation.get("key_metric_name")) or 0.0),
                "best_metric": float(evaluation.get("best_metric") or stats.get("best_metric") or 0.0),
                "best_metric_epoch": int(evaluation.get("best_metric_epoch", 0) or 0),
            }
            if kind == "completed":
                progress["estimated_remaining_seconds"] = 0.0
            self.last_progress[job_id] = progress
            loop.create_task(self.store.update(job_id, {"progress": progress, "train_stats": stats}))
        elif kind == "checkpoint":
            self._pending_checkpoint[job_id] = {**event, "trainer": trainer}
            if job_id not in self._publishers or self._publishers[job_id].done():
                self._publishers[job_id] = loop.create_task(self._publish_loop(job_id))
        elif kind == "started":
            loop.create_task(self.store.log(job_id, f"training on {event.get('train_items')} image(s), validating on {event.get('val_items')}"))

    async def _publish_loop(self, job_id: str) -> None:
        """Publishes the newest pending checkpoint until none is left (older ones are skipped)."""
        while job_id in self._pending_checkpoint:
            event = self._pending_checkpoint.pop(job_id)
            trainer = event["trainer"]
            path = Path(event["path"])
            try:
                doc = await self.store.get(job_id)
                metrics = {
                    "best_metric": float(event.get("metric", 0.0)),
                    "best_metric_epoch": int(event.get("epoch", 0)),
                    "key_metric_name": str(event.get("metric_name", "")),
                }
                version = await self.datastore.upload_model_version(
                    trainer,
                    path,
                    metrics=metrics,
                    info={"training_job": f"trainingJobs/{job_id}", "trainer": trainer, "params": doc.get("resolved_params", {})},
                )
                name = getattr(version, "name", "") or f"models/{trainer}/versions/{getattr(version, 'version', '')}"
                self.published[trainer] = self.published.get(trainer, 0) + 1
                await self.store.update(job_id, {"model_version": name})
                await self.store.log(job_id, f"New Model published: {name} ({metrics['key_metric_name']} {metrics['best_metric']:.4f} at epoch {metrics['best_metric_epoch']})")
            except LabelgridError as err:
                await self.store.log(job_id, f"publishing the checkpoint of epoch {event.get('epoch')} failed: {err.message}")
            finally:
                await asyncio.to_thread(_remove_older_checkpoints, path)

    async def _drain_publisher(self, job_id: str) -> None:
        # Let the event tailer deliver the last events, then wait for the uploads they caused.
        await asyncio.sleep(0)
        task = self._publishers.pop(job_id, None)
        if job_id in self._pending_checkpoint and (task is None or task.done()):
            task = asyncio.get_running_loop().create_task(self._publish_loop(job_id))
        if task is not None:
            await task
        self.last_progress.pop(job_id, None)


def _remove_older_checkpoints(path: Path) -> None:
    for other in path.parent.glob("model_epoch*.pt"):
        if other.name < path.name:
            other.unlink(missing_ok=True)


def _split(datalist: list[dict[str, str]], val_split: float) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """MONAI Label's partition by val_split; with too few images to hold any out, validation
    runs on the training images (so the key metric is still measured on whole volumes)."""
    if val_split <= 0:
        return datalist, []
    val_count = int(len(datalist) * val_split)
    if val_count == 0 or val_count >= len(datalist):
        return datalist, list(datalist)
    return datalist[val_count:], datalist[:val_count]
