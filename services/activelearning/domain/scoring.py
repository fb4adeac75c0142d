"""Scoring jobs: score images in the background and store the scores in the datastore.

A job scores every image of the method's set (unlabeled images for epistemic and TTA,
labeled ones for Dice) with the served version of the method's model, one image after
another on the scoring device, and stores each score as it goes (SetImageScore: the
indexed score plus MONAI Label's `<key>` and `<key>_ts` image info) together with
`<key>_model_version`, so a later run skips images already scored with that version and
rescores them once a new version is published. Jobs run one at a time, in order; they are
datastore records (JobStore), so a restarted service lists them and, by default, queues
again the ones it was running (they resume: what was stored is skipped).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apps.api.activelearning import ImageSet, ScoringMethod
from services.activelearning.domain.model import UNTRAINED, ImageEntry, JobPage, ScoringJob, ScoringProgress
from services.activelearning.domain.ports import LeaseStore, Scorer
from services.common.apps import LoadedApp
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    LabelgridError,
    NotFound,
    ResourceExhausted,
)
from services.common.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobError, JobStore
from services.common.paging import offset_page
from services.common.paging import page_size as checked_page_size
from services.common.tasks import cancel_all, spawn

log = logging.getLogger("labelgrid.activelearning.scoring")

MAX_QUEUED = 32
"""Scoring jobs waiting at once; one more is RESOURCE_EXHAUSTED (QUEUE_FULL, MONAI Label's 429)."""

RECORD_KIND = "scoringJobs"
# The datastore's reasons when an image (or its label) went away while a job scored it.
GONE_REASONS = frozenset({"IMAGE_NOT_FOUND", "LABEL_NOT_FOUND"})


def version_key(score_key: str) -> str:
    """The image info key that says which model version computed `score_key`."""
    return f"{score_key}_model_version"


def already_scored(image: ImageEntry, score_key: str, version: str) -> bool:
    return score_key in image.scores and image.info.get(version_key(score_key)) == version


@dataclass
class _Tally:
    """A running job's counts while it runs; the job stores snapshots of it."""

    total: int = 0
    scored: int = 0
    skipped: int = 0
    failed: int = 0

    def snapshot(self) -> ScoringProgress:
        return ScoringProgress(total=self.total, scored=self.scored, skipped=self.skipped, failed=self.failed)


class ScoringJobs:
    """Create, get, list, cancel and watch scoring jobs; runs them one after another."""

    def __init__(
        self,
        app: LoadedApp,
        store: LeaseStore,
        jobs: JobStore[ScoringJob],
        scorer: Scorer,
        work_dir: Path,
        label_tag: str = "final",
        auto_scoring_seconds: float = 0.0,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self.app = app
        self.max_queued = max_queued
        self.store = store
        self.jobs = jobs
        self.scorer = scorer
        self.work_dir = work_dir
        self.label_tag = label_tag
        self.auto_scoring_seconds = auto_scoring_seconds
        self._queue: list[str] = []
        self._wake = asyncio.Event()
        self._running: str | None = None
        self._cancelled: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        # (method, outcome) -> images; outcome: scored, skipped, failed.
        self.images: Counter[tuple[str, str]] = Counter()
        # Last known count of jobs per state (refreshed on every change this process makes).
        self.states: Counter[str] = Counter()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, resume: bool = True, retry_seconds: float = 2.0) -> None:
        """Starts the runner in the background. It first takes over the jobs a previous
        process left active (retrying while the datastore cannot be reached): with `resume`
        they are queued again, oldest first, and skip what they already stored; otherwise
        they are marked FAILED."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.taken_over: asyncio.Future[list[ScoringJob]] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            while True:
                try:
                    left = await self._take_over(resume)
                    break
                except LabelgridError as error:
                    log.warning("cannot read scoring jobs yet; retrying", extra={"error": error.message})
                    await asyncio.sleep(retry_seconds)
            self.taken_over.set_result(left)
            if left:
                log.info(
                    "scoring jobs of a previous process taken over",
                    extra={"jobs": [j.job_id for j in left], "resumed": resume},
                )
            await self._run_forever()

        spawn(self._tasks, run(), "scoring-runner")
        if self.auto_scoring_seconds > 0:
            spawn(self._tasks, self._auto_score(), "auto-scoring")

    async def _take_over(self, resume: bool) -> list[ScoringJob]:
        if resume:
            left = [job for job in await self.jobs.list() if job.state.active and job.job_id not in self._queue]
            left.sort(key=lambda job: job.create_time)
            for job in left:
                await self.jobs.update(
                    job.job_id, {"state": QUEUED, "log_tail": (*job.log_tail, "queued again: the service restarted")}
                )
            self._queue[:0] = [job.job_id for job in left]
        else:
            left = await self.jobs.recover()
        await self._count_states()
        self._wake.set()
        return left

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        await self.jobs.flush()

    # -- use cases ----------------------------------------------------------------------------

    def method(self, name: str) -> ScoringMethod:
        return self.app.lookup("scoring_methods", name)

    def _model(self, method_name: str, method: ScoringMethod, model: str) -> str:
        model = model or method.model
        self.app.lookup("infer_tasks", model)
        return model

    async def create(
        self,
        method_name: str,
        *,
        model: str = "",
        params: dict[str, Any] | None = None,
        force: bool = False,
        enqueue: bool = False,
        request_id: str = "",
    ) -> ScoringJob:
        method = self.method(method_name)
        model = self._model(method_name, method, model)
        if request_id:
            existing = await self.jobs.find_request(request_id)
            if existing is not None:
                return self._with_position(existing)
        if not enqueue:
            for job_id in [*([self._running] if self._running else []), *self._queue]:
                active = await self.jobs.get(job_id)
                if active.method == method_name and active.state.active:
                    raise AlreadyExists(
                        f"a {method_name!r} scoring job is already {active.state.lower()} ({job_id}); "
                        "wait for it, cancel it, or ask to enqueue",
                        reason="ALREADY_RUNNING",
                    )
        if len(self._queue) >= self.max_queued:
            raise ResourceExhausted(
                f"{len(self._queue)} scoring jobs are queued, the limit is {self.max_queued}: retry once some have run",
                reason="QUEUE_FULL",
            )
        job = ScoringJob(method=method_name, model=model, params=dict(params or {}), force=bool(force))
        job, _created = await self.jobs.create(job, request_id=request_id)
        self._queue.append(job.job_id)
        self.states[QUEUED] += 1
        self._wake.set()
        log.info("scoring job queued", extra={"job": job.job_id, "method": method_name, "model": model})
        return self._with_position(job)

    async def get(self, job_id: str) -> ScoringJob:
        return self._with_position(await self.jobs.get(job_id))

    async def list(self, state: str = "", method: str = "", page_size: int = 0, page_token: str = "") -> JobPage:
        checked_page_size(page_size)
        if method:
            self.method(method)
        jobs = await self.jobs.list(state=state or None, where=(lambda job: job.method == method) if method else None)
        page, token = offset_page(jobs, page_size, page_token, "ListScoringJobs")
        return JobPage([self._with_position(job) for job in page], token)

    async def cancel(self, job_id: str) -> ScoringJob:
        job = await self.jobs.get(job_id)
        if job.state.final:
            raise FailedPrecondition(f"scoring job {job_id} has already ended ({job.state})")
        self._cancelled.add(job_id)
        if job_id in self._queue:
            self._queue.remove(job_id)
        job = await self.jobs.update(job_id, {"state": CANCELLED, "log_tail": (*job.log_tail, "cancelled")})
        await self._count_states()
        return self._with_position(job)

    async def watch(self, job_id: str) -> AsyncIterator[ScoringJob]:
        async for job in self.jobs.watch(job_id):
            yield self._with_position(job)

    def _with_position(self, job: ScoringJob) -> ScoringJob:
        queued = job.job_id in self._queue and job.state == QUEUED
        return job.at_position(self._queue.index(job.job_id) + 1 if queued else 0)

    async def _count_states(self) -> None:
        try:
            jobs = await self.jobs.list()
        except LabelgridError:
            return
        self.states = Counter(job.state for job in jobs)

    # -- the runner ----------------------------------------------------------------------------

    async def _run_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                job_id = self._queue.pop(0)
                self._running = job_id
                try:
                    await self._run(job_id)
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    log.exception("scoring job crashed", extra={"job": job_id})
                    await self._crashed(job_id, error)
                finally:
                    self._running = None
                    await self._count_states()

    async def _crashed(self, job_id: str, error: Exception) -> None:
        """Ends a job whose run broke outside the per-image handling (e.g. the datastore
        refused its RUNNING write), so it does not show RUNNING forever. The state is set in
        memory even when the datastore still refuses the write; a restart resumes the job."""
        try:
            current = await self.jobs.get(job_id)
            if current.state.active:
                message = error.message if isinstance(error, LabelgridError) else f"{type(error).__name__}: {error}"
                await self._fail(job_id, current.progress, "SERVER_ERROR", message)
        except Exception:  # noqa: BLE001 - the runner must go on with the next job
            log.warning("could not store that the scoring job failed", extra={"job": job_id})

    async def _run(self, job_id: str) -> None:
        job = await self.jobs.get(job_id)
        if job.state != QUEUED or job_id in self._cancelled:
            return
        method_name = job.method
        tally = _Tally()
        await self.jobs.update(job_id, {"state": RUNNING, "progress": tally.snapshot()})
        await self._count_states()
        try:
            method = self.method(method_name)
            model = self._model(method_name, method, job.model)
            task = self.app.infer_tasks[model]
            version = await self.store.serving_version(model) or UNTRAINED
            labeled = method.images is ImageSet.LABELED
            images = await self.store.images(labeled, self.label_tag)
            tally.total = len(images)
            started = (
                f"scoring {len(images)} {'labeled' if labeled else 'unlabeled'} images with {model} version {version}"
            )
            await self.jobs.update(
                job_id, {"model_version": version, "progress": tally.snapshot(), "log_tail": (*job.log_tail, started)}
            )
            for image in images:
                if job_id in self._cancelled:
                    break
                if not job.force and already_scored(image, method.score_key, version):
                    tally.skipped += 1
                    self.images[(method_name, "skipped")] += 1
                else:
                    await self._score_one(job, method, model, task, version, image, tally)
                await self.jobs.update(job_id, {"progress": tally.snapshot()}, persist=False)
        except LabelgridError as error:
            await self._fail(job_id, tally.snapshot(), error.reason, error.message)
            return
        except Exception as error:
            log.exception("scoring job failed", extra={"job": job_id})
            await self._fail(job_id, tally.snapshot(), "SERVER_ERROR", f"{type(error).__name__}: {error}")
            return
        if job_id in self._cancelled:
            await self.jobs.update(job_id, {"progress": tally.snapshot()})
            return
        line = f"done: {tally.scored} scored, {tally.skipped} skipped, {tally.failed} failed"
        current = await self.jobs.get(job_id)
        if tally.failed and not tally.scored and not tally.skipped:
            await self._fail(
                job_id, tally.snapshot(), "INFERENCE_ERROR", f"every image failed to score ({tally.failed})"
            )
            return
        await self.jobs.update(
            job_id, {"state": SUCCEEDED, "progress": tally.snapshot(), "log_tail": (*current.log_tail, line)}
        )
        log.info("scoring job done", extra={"job": job_id, **tally.snapshot().model_dump()})

    async def _fail(self, job_id: str, progress: ScoringProgress, reason: str, message: str) -> None:
        current = await self.jobs.get(job_id)
        if current.state.final or job_id in self._cancelled:
            # Cancelled while it ran: it stays CANCELLED (what the canceller was told).
            await self.jobs.update(job_id, {"progress": progress})
            return
        await self.jobs.update(
            job_id,
            {
                "state": FAILED,
                "progress": progress,
                "error": JobError(reason=reason, message=message),
                "log_tail": (*current.log_tail, f"failed: {message}"),
            },
        )

    async def _score_one(
        self,
        job: ScoringJob,
        method: ScoringMethod,
        model: str,
        task: Any,
        version: str,
        image: ImageEntry,
        tally: _Tally,
    ) -> None:
        job_id, method_name = job.job_id, job.method
        scratch = Path(tempfile.mkdtemp(prefix="score-", dir=self.work_dir))
        try:
            path = await self.store.download_image(image.image_id, scratch)
            label = None
            if method.images is ImageSet.LABELED:
                label_dir = scratch / "label"
                label_dir.mkdir()
                label = await self.store.download_label(image.image_id, self.label_tag, label_dir)
            value = await self.scorer.score(method, task, model, version, path, label, dict(job.params))
            if job_id in self._cancelled:
                return
            await self.store.set_score(image.image_id, method.score_key, value, version)
            await self.store.update_info(image.image_id, {version_key(method.score_key): version})
            tally.scored += 1
            self.images[(method_name, "scored")] += 1
        except asyncio.CancelledError:
            raise
        except NotFound as error:
            if error.reason not in GONE_REASONS:
                await self._image_failed(job_id, method_name, image, error.message, tally)
                return
            # Deleted (or, for Dice, unlabeled) since the job listed it: nothing left to score.
            tally.skipped += 1
            self.images[(method_name, "skipped")] += 1
            await self.jobs.log(job_id, f"image {image.image_id}: skipped, {error.message}")
        except Exception as error:  # noqa: BLE001 - one bad image must not end the run
            message = error.message if isinstance(error, LabelgridError) else f"{type(error).__name__}: {error}"
            await self._image_failed(job_id, method_name, image, message, tally)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def _image_failed(
        self, job_id: str, method_name: str, image: ImageEntry, message: str, tally: _Tally
    ) -> None:
        tally.failed += 1
        self.images[(method_name, "failed")] += 1
        await self.jobs.log(job_id, f"image {image.image_id}: {message}")

    # -- auto scoring -------------------------------------------------------------------------

    async def _auto_score(self) -> None:
        """MONAI Label's auto scoring: on start, and whenever a method's model gets a new version."""
        seen: dict[str, str] = {}
        while True:
            for name, method in self.app.scoring_methods.items():
                try:
                    version = await self.store.serving_version(method.model) or UNTRAINED
                    if seen.get(name) != version:
                        await self.create(name, enqueue=True, request_id=f"auto-{name}-{version}")
                        seen[name] = version
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # noqa: BLE001 - retried on the next round
                    log.warning("auto scoring could not start", extra={"method": name, "error": str(error)})
            await asyncio.sleep(self.auto_scoring_seconds)
