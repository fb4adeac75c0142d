"""Batch inference (MONAI Label's /batch/infer): one model over many datastore images, each
result saved as a label (tag "original" by default), as a job of the inference service.

The images run concurrently through the same device scheduler as single inferences (as
many at once as the devices have slots, plus one waiting per slot so no device idles
between images), not one after another (MONAI Label's issue 1192). A job belongs to the
service, not to the request that started it: a client that hangs up changes nothing, and
only CancelBatchInferenceJob stops it. One job runs at a time per service (a second is
ALREADY_RUNNING, MONAI Label's 429, unless enqueued). An image that fails is counted and
logged, and the job goes on. Jobs are `BatchJob`s stored as datastore records
(services.common.jobs), so they outlive the process; a restarted service marks the ones it
lost as FAILED.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import logging
import os
import socket
import uuid
from collections import deque
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, LabelgridError, ResourceExhausted
from services.common.jobs import CANCELLED, FAILED, RUNNING, SUCCEEDED, Job, JobError, JobStore
from services.common.tasks import spawn
from services.infer.domain.inference import Inference
from services.infer.domain.model import ImageInput, InferParams

log = logging.getLogger("labelgrid.infer.batch")

RECORD_KIND = "batchInferenceJobs"
FILTERS = ("ALL", "LABELED", "UNLABELED")
DEFAULT_TAG = "original"
MAX_IMAGES = 100_000
MAX_QUEUED = 32
"""Batch jobs waiting at once; one more is RESOURCE_EXHAUSTED (QUEUE_FULL, MONAI Label's 429)."""


@dataclasses.dataclass(frozen=True)
class ImageOutcome:
    """One image's inference in a batch: where it ran, the saved label, the result params."""

    device: str
    saved_label: str
    params: dict[str, Any]


class ImageResult(BaseModel):
    """One image's outcome, kept when the job keeps results (MONAI Label's run_sync answer)."""

    model_config = ConfigDict(frozen=True)

    image: str
    # A label is named by its image ("images/{image}/labels/{tag}"): MONAI Label's label id is the image id.
    label: str = ""
    label_tag: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    failed: bool = False


class BatchJob(Job):
    """A batch inference job: which model over which images, where, and how far it got."""

    model: str = ""
    image_filter: str = "ALL"
    images: tuple[str, ...] = ()
    max_images: int = 0
    devices: tuple[str, ...] = ()
    params: dict[str, Any] = Field(default_factory=dict)
    label_tag: str = ""
    # Progress: images to run, run, and failed.
    total_images: int = 0
    processed_images: int = 0
    failed_images: int = 0
    # The replica running it (host:pid): a restarted service recovers only its own lost jobs.
    owner: str = ""
    keep_results: bool = False
    results: tuple[ImageResult, ...] = ()


class InferOne(Protocol):
    async def __call__(self, model: str, image_id: str, params: InferParams) -> ImageOutcome:
        """Runs the model on one datastore image, saving the label."""
        ...


class ImageLister(Protocol):
    async def image_ids(self, image_filter: str) -> list[str]:
        """Ids of the datastore's images: all, or those with / without a final label."""
        ...


def owner_id() -> str:
    """Who runs a job: host, pid and a token of this process's life (a restarted container has
    the same host and often the same pid, 1, but never the same token)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def owner_lost(owner: str, me: str) -> bool:
    """Whether the process that owned a job is gone, as far as `me` (another owner id) can tell:
    only owners on this host are judged; there, an earlier life with my pid, or a pid that no
    longer runs, is gone, while a live pid is a replica sharing the host and keeps its jobs."""
    if owner == me:
        return False
    host, _, rest = owner.partition(":")
    my_host, _, my_rest = me.partition(":")
    if host != my_host:
        return False  # another machine or pod: its own restart recovers it
    pid, my_pid = rest.split(":", 1)[0], my_rest.split(":", 1)[0]
    if not pid.isdigit() or pid == my_pid:
        return True
    return not _pid_alive(int(pid))


class BatchInference:
    """Create, list, get and cancel batch inference jobs; runs them one at a time."""

    def __init__(
        self,
        inference: Inference,
        images: ImageLister,
        store: JobStore[BatchJob],
        width: int | None = None,
        infer_one: InferOne | None = None,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self.inference = inference
        self.max_queued = max_queued
        self.images = images
        self.store = store
        # Where each image runs: this replica's devices, or (RemoteInfer) every replica's.
        self.infer_one: InferOne = infer_one or self._infer_here
        # Images in flight at once: every slot busy and one waiting behind each.
        self.width = width or max(1, 2 * sum(q.concurrency for q in inference.scheduler.queues.values()))
        self.owner = owner_id()
        self._params: dict[str, InferParams] = {}
        self._queue: deque[str] = deque()
        self._running: str | None = None
        self._current: asyncio.Task[None] | None = None  # the running job
        self._runner: asyncio.Task[None] | None = None  # runs the queue, one job after another
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()
        self._recovered = False

    async def _infer_here(self, model: str, image_id: str, params: InferParams) -> ImageOutcome:
        outcome = await self.inference.infer(model, ImageInput(image_id=image_id), params)
        outcome.cleanup()
        return ImageOutcome(outcome.device, outcome.saved_label, dict(outcome.result_params))

    async def _recover(self) -> None:
        """Once: jobs a dead process on this host left active are FAILED (they died with it);
        a live replica's jobs on the same host are left alone."""
        if self._recovered:
            return
        self._recovered = True
        for job in await self.store.list():
            if job.state.active and owner_lost(job.owner, self.owner):
                await self.store.update(
                    job.job_id,
                    {"state": FAILED, "error": JobError(reason="SERVER_ERROR", message="lost: the service restarted")},
                )

    # -- use cases ---------------------------------------------------------------------------

    async def create(
        self,
        model: str,
        params: InferParams,
        *,
        image_filter: str = "ALL",
        images: list[str] | None = None,
        max_images: int = 0,
        devices: list[str] | None = None,
        enqueue: bool = False,
        request_id: str = "",
        keep_results: bool = False,
    ) -> BatchJob:
        """Queues a job. keep_results: the job keeps each image's outcome (label, tag, result params)
        in its `results`, MONAI Label's run_sync answer; off, a job over many images stays small."""
        self.inference.task(model)  # NOT_FOUND for an unknown model, now
        self.inference.check_params(params)
        if image_filter not in FILTERS:
            raise InvalidArgument(f"unknown image filter {image_filter!r}; use one of {', '.join(FILTERS)}")
        if not 0 <= max_images <= MAX_IMAGES:
            raise InvalidArgument(f"max_images must be between 0 and {MAX_IMAGES}")
        if images is not None and len(images) > MAX_IMAGES:
            raise InvalidArgument(f"at most {MAX_IMAGES} images per batch")
        for device in devices or []:
            self.inference.scheduler.pick(device)  # INVALID_ARGUMENT for a device this service lacks
        tag = params.result.label_tag or DEFAULT_TAG
        params = dataclasses.replace(
            params, result=dataclasses.replace(params.result, save_label=True, label_tag=tag, params_only=True)
        )
        await self._recover()
        async with self._lock:
            running = self._current is not None and not self._current.done()  # a job just ended is not busy
            busy = running or bool(self._queue)
            if busy and not enqueue:
                raise AlreadyExists("++++++++++ Batch_infer Task is Already Running", reason="ALREADY_RUNNING")
            if len(self._queue) >= self.max_queued:
                raise ResourceExhausted(
                    f"{len(self._queue)} batch inference jobs are queued, the limit is {self.max_queued}: "
                    "retry once some have run",
                    reason="QUEUE_FULL",
                )
            job = BatchJob(
                model=model,
                image_filter=image_filter,
                images=tuple(images or ()),
                max_images=max_images,
                devices=tuple(devices or ()),
                params=dict(params.extra),
                label_tag=tag,
                owner=self.owner,
                keep_results=keep_results,
            )
            job, created = await self.store.create(job, request_id)
            if not created:
                return job
            self._params[job.job_id] = params
            self._queue.append(job.job_id)
            if self._runner is None or self._runner.done():
                self._runner = spawn(self._tasks, self._run_queue(), "batch-inference")
        return job

    async def get(self, job_id: str) -> BatchJob:
        await self._recover()
        return self._with_position(await self.store.get(job_id))

    async def list(self, state: str | None = None, model: str = "") -> builtins.list[BatchJob]:
        await self._recover()
        found = await self.store.list(state, where=(lambda job: job.model == model) if model else None)
        return [self._with_position(job) for job in found]

    async def cancel(self, job_id: str) -> BatchJob:
        stored = await self.store.get(job_id)
        if stored.state.final:
            raise FailedPrecondition(f"batch inference {job_id} has already ended ({stored.state})")
        async with self._lock:
            if job_id in self._queue:
                self._queue.remove(job_id)
                self._params.pop(job_id, None)
                return await self.store.update(job_id, {"state": CANCELLED})
            current = self._current if self._running == job_id else None
        if current is None:
            raise FailedPrecondition(f"batch inference {job_id} runs in another replica of the inference service")
        current.cancel()
        await asyncio.wait([current])  # it writes CANCELLED itself
        return await self.store.get(job_id)

    async def close(self) -> None:
        """Stops the running job and drops the queued ones (both CANCELLED)."""
        async with self._lock:
            queued, self._queue = list(self._queue), deque()
            runner = self._runner
        for job_id in queued:
            await self.store.update(job_id, {"state": CANCELLED})
        if runner is not None and not runner.done():
            runner.cancel()
            await asyncio.wait([runner])
        await self.store.flush()

    # -- running -----------------------------------------------------------------------------

    def _with_position(self, job: BatchJob) -> BatchJob:
        queue = list(self._queue)
        return job.at_position(queue.index(job.job_id) + 1 if job.job_id in queue else 0)

    async def _run_queue(self) -> None:
        while True:
            async with self._lock:
                if not self._queue:
                    self._running = self._current = None
                    return
                job_id = self._queue.popleft()
                self._running = job_id
                self._current = asyncio.create_task(self._run(job_id, self._params.pop(job_id)), name=f"batch-{job_id}")
            try:
                await self._current
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # the service stops
                    self._running = self._current = None
                    raise
                # else only this job was cancelled: on with the next one
            except Exception as error:
                log.exception("batch inference failed", extra={"job_id": job_id})
                reason = error.reason if isinstance(error, LabelgridError) else "SERVER_ERROR"
                message = error.message if isinstance(error, LabelgridError) else f"{type(error).__name__}: {error}"
                await self.store.update(job_id, {"state": FAILED, "error": JobError(reason=reason, message=message)})

    async def _select(self, job: BatchJob) -> builtins.list[str]:  # `list` is a method here
        if job.images:
            chosen = list(dict.fromkeys(job.images))
        else:
            chosen = sorted(await self.images.image_ids(job.image_filter))
        return chosen[: job.max_images] if job.max_images else chosen

    async def _run(self, job_id: str, params: InferParams) -> None:
        job = await self.store.update(job_id, {"state": RUNNING})
        image_ids = await self._select(job)
        model, devices = job.model, job.devices
        await self.store.update(job_id, {"total_images": len(image_ids)})
        await self.store.log(job_id, f"batch inference of {model} over {len(image_ids)} images, {self.width} at a time")
        counts = {"processed_images": 0, "failed_images": 0}
        pending = deque(enumerate(image_ids))
        outcomes: dict[str, ImageResult] = {}
        tag = params.result.label_tag or DEFAULT_TAG

        def results() -> dict[str, Any]:
            # In image order, the images that have run so far.
            return {"results": tuple(outcomes[i] for i in image_ids if i in outcomes)} if job.keep_results else {}

        async def one(index: int, image_id: str) -> None:
            device = devices[index % len(devices)] if devices else params.device
            try:
                outcome = await self.infer_one(model, image_id, dataclasses.replace(params, device=device))
            except LabelgridError as error:
                counts["failed_images"] += 1
                line = f"{image_id}: failed: {error.message}"
                outcomes[image_id] = ImageResult(image=image_id, failed=True)
            else:
                counts["processed_images"] += 1
                line = f"{image_id} => {outcome.device} => {outcome.saved_label}"
                outcomes[image_id] = ImageResult(image=image_id, label=image_id, label_tag=tag, params=outcome.params)
            done = counts["processed_images"] + counts["failed_images"]
            await self.store.update(job_id, dict(counts), persist=False)
            await self.store.log(job_id, f"{line} ({done} / {len(image_ids)})")

        async def worker() -> None:
            while pending:
                index, image_id = pending.popleft()
                await one(index, image_id)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.width, len(image_ids))):
                    group.create_task(worker())
        except asyncio.CancelledError:
            await asyncio.shield(self.store.update(job_id, {"state": CANCELLED, **counts, **results()}))
            await asyncio.shield(self.store.log(job_id, "stopped; labels saved so far stay"))
            raise
        await self.store.update(job_id, {"state": SUCCEEDED, **counts, **results()})
        log.info("batch inference done", extra={"job_id": job_id, "model": model, **counts})
