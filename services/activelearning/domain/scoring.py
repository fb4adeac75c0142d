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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apps.api.activelearning import ImageSet, ScoringMethod
from services.activelearning.domain.model import UNTRAINED, ImageEntry, JobPage
from services.activelearning.domain.ports import LeaseStore, Scorer
from services.common import jobs as job_states
from services.common.apps import LoadedApp
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    LabelgridError,
    NotFound,
)
from services.common.jobs import JobStore, new_job, parse_time
from services.common.paging import offset_page
from services.common.paging import page_size as checked_page_size

log = logging.getLogger("labelgrid.activelearning.scoring")

RECORD_KIND = "scoringJobs"
# The datastore's reasons when an image (or its label) went away while a job scored it.
GONE_REASONS = frozenset({"IMAGE_NOT_FOUND", "LABEL_NOT_FOUND"})


def version_key(score_key: str) -> str:
    """The image info key that says which model version computed `score_key`."""
    return f"{score_key}_model_version"


def already_scored(image: ImageEntry, score_key: str, version: str) -> bool:
    return score_key in image.scores and image.info.get(version_key(score_key)) == version


class ScoringJobs:
    """Create, get, list, cancel and watch scoring jobs; runs them one after another."""

    def __init__(
        self,
        app: LoadedApp,
        store: LeaseStore,
        jobs: JobStore,
        scorer: Scorer,
        work_dir: Path,
        label_tag: str = "final",
        auto_scoring_seconds: float = 0.0,
    ) -> None:
        self.app = app
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
        self._tasks: list[asyncio.Task[None]] = []
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
        self.taken_over: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()

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
                log.info("scoring jobs of a previous process taken over", extra={"jobs": [d["job_id"] for d in left], "resumed": resume})
            await self._run_forever()

        self._tasks.append(asyncio.create_task(run(), name="scoring-runner"))
        if self.auto_scoring_seconds > 0:
            self._tasks.append(asyncio.create_task(self._auto_score(), name="auto-scoring"))

    async def _take_over(self, resume: bool) -> list[dict[str, Any]]:
        if resume:
            left = [
                d for d in await self.jobs.list()
                if d.get("state") in job_states.ACTIVE_STATES and d["job_id"] not in self._queue
            ]  # fmt: skip
            left.sort(key=lambda d: d.get("create_time") or "")
            for doc in left:
                await self.jobs.update(
                    doc["job_id"],
                    {"state": job_states.QUEUED, "log_tail": [*(doc.get("log_tail") or []), "queued again: the service restarted"]},
                )
            self._queue[:0] = [doc["job_id"] for doc in left]
        else:
            left = await self.jobs.recover()
        await self._count_states()
        self._wake.set()
        return left

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("scoring task failed while stopping")
        self._tasks.clear()
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
    ) -> dict[str, Any]:
        method = self.method(method_name)
        model = self._model(method_name, method, model)
        params = dict(params or {})
        if request_id:
            since = datetime.now(UTC) - timedelta(hours=24)
            for existing in await self.jobs.list(where=lambda d: d.get("request_id") == request_id):
                created = parse_time(existing.get("create_time"))
                if created and created >= since:
                    return self._with_position(existing)
        if not enqueue:
            for job_id in [*([self._running] if self._running else []), *self._queue]:
                doc = await self.jobs.get(job_id)
                if doc.get("method") == method_name and doc.get("state") in job_states.ACTIVE_STATES:
                    raise AlreadyExists(
                        f"a {method_name!r} scoring job is already {doc['state'].lower()} ({job_id}); "
                        "wait for it, cancel it, or ask to enqueue",
                        reason="ALREADY_RUNNING",
                    )
        doc = new_job(
            method=method_name,
            model=model,
            params=params,
            force=bool(force),
            model_version="",
            progress={"total": 0, "scored": 0, "skipped": 0, "failed": 0},
        )
        doc, _created = await self.jobs.create(doc, request_id=request_id)
        self._queue.append(doc["job_id"])
        self.states[job_states.QUEUED] += 1
        self._wake.set()
        log.info("scoring job queued", extra={"job": doc["job_id"], "method": method_name, "model": model})
        return self._with_position(doc)

    async def get(self, job_id: str) -> dict[str, Any]:
        return self._with_position(await self.jobs.get(job_id))

    async def list(self, state: str = "", method: str = "", page_size: int = 0, page_token: str = "") -> JobPage:
        checked_page_size(page_size)
        if method:
            self.method(method)
        docs = await self.jobs.list(
            state=state or None, where=(lambda d: d.get("method") == method) if method else None
        )
        page, token = offset_page(docs, page_size, page_token, "ListScoringJobs")
        return JobPage([self._with_position(d) for d in page], token)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        doc = await self.jobs.get(job_id)
        if doc.get("state") in job_states.FINAL_STATES:
            raise FailedPrecondition(f"scoring job {job_id} has already ended ({doc['state']})")
        self._cancelled.add(job_id)
        if job_id in self._queue:
            self._queue.remove(job_id)
        doc = await self.jobs.update(job_id, {"state": job_states.CANCELLED, "log_tail": [*(doc.get("log_tail") or []), "cancelled"]})
        await self._count_states()
        return self._with_position(doc)

    async def watch(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        async for doc in self.jobs.watch(job_id):
            yield self._with_position(doc)

    def _with_position(self, doc: dict[str, Any]) -> dict[str, Any]:
        job_id = doc.get("job_id")
        position = self._queue.index(job_id) + 1 if job_id in self._queue and doc.get("state") == job_states.QUEUED else 0
        return {**doc, "queue_position": position}

    async def _count_states(self) -> None:
        try:
            docs = await self.jobs.list()
        except LabelgridError:
            return
        self.states = Counter(d.get("state", "") for d in docs)

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
            if current.get("state") in job_states.ACTIVE_STATES:
                progress = dict(current.get("progress") or {})
                message = error.message if isinstance(error, LabelgridError) else f"{type(error).__name__}: {error}"
                await self._fail(job_id, progress, "SERVER_ERROR", message)
        except Exception:  # noqa: BLE001 - the runner must go on with the next job
            log.warning("could not store that the scoring job failed", extra={"job": job_id})

    async def _run(self, job_id: str) -> None:
        doc = await self.jobs.get(job_id)
        if doc.get("state") != job_states.QUEUED or job_id in self._cancelled:
            return
        method_name = doc["method"]
        progress = {"total": 0, "scored": 0, "skipped": 0, "failed": 0}
        await self.jobs.update(job_id, {"state": job_states.RUNNING, "progress": progress})
        await self._count_states()
        try:
            method = self.method(method_name)
            model = self._model(method_name, method, doc.get("model", ""))
            task = self.app.infer_tasks[model]
            version = await self.store.serving_version(model) or UNTRAINED
            labeled = method.images is ImageSet.LABELED
            images = await self.store.images(labeled, self.label_tag)
            progress["total"] = len(images)
            await self.jobs.update(
                job_id,
                {
                    "model_version": version,
                    "progress": dict(progress),
                    "log_tail": [*(doc.get("log_tail") or []), f"scoring {len(images)} {'labeled' if labeled else 'unlabeled'} images with {model} version {version}"],
                },
            )
            for image in images:
                if job_id in self._cancelled:
                    break
                if not doc.get("force") and already_scored(image, method.score_key, version):
                    progress["skipped"] += 1
                    self.images[(method_name, "skipped")] += 1
                else:
                    await self._score_one(job_id, method_name, method, model, task, version, image, doc, progress)
                await self.jobs.update(job_id, {"progress": dict(progress)}, persist=False)
        except LabelgridError as error:
            await self._fail(job_id, progress, error.reason, error.message)
            return
        except Exception as error:
            log.exception("scoring job failed", extra={"job": job_id})
            await self._fail(job_id, progress, "SERVER_ERROR", f"{type(error).__name__}: {error}")
            return
        if job_id in self._cancelled:
            await self.jobs.update(job_id, {"progress": dict(progress)})
            return
        line = f"done: {progress['scored']} scored, {progress['skipped']} skipped, {progress['failed']} failed"
        current = await self.jobs.get(job_id)
        if progress["failed"] and not progress["scored"] and not progress["skipped"]:
            await self._fail(job_id, progress, "INFERENCE_ERROR", f"every image failed to score ({progress['failed']})")
            return
        await self.jobs.update(
            job_id,
            {"state": job_states.SUCCEEDED, "progress": dict(progress), "log_tail": [*(current.get("log_tail") or []), line]},
        )
        log.info("scoring job done", extra={"job": job_id, **progress})

    async def _fail(self, job_id: str, progress: dict[str, int], reason: str, message: str) -> None:
        current = await self.jobs.get(job_id)
        if current.get("state") in job_states.FINAL_STATES or job_id in self._cancelled:
            # Cancelled while it ran: it stays CANCELLED (what the canceller was told).
            await self.jobs.update(job_id, {"progress": dict(progress)})
            return
        await self.jobs.update(
            job_id,
            {
                "state": job_states.FAILED,
                "progress": dict(progress),
                "error": {"reason": reason, "message": message},
                "log_tail": [*(current.get("log_tail") or []), f"failed: {message}"],
            },
        )

    async def _score_one(
        self, job_id: str, method_name: str, method: ScoringMethod, model: str, task: Any, version: str,
        image: ImageEntry, doc: dict[str, Any], progress: dict[str, int],
    ) -> None:  # fmt: skip
        scratch = Path(tempfile.mkdtemp(prefix="score-", dir=self.work_dir))
        try:
            path = await self.store.download_image(image.image_id, scratch)
            label = None
            if method.images is ImageSet.LABELED:
                label_dir = scratch / "label"
                label_dir.mkdir()
                label = await self.store.download_label(image.image_id, self.label_tag, label_dir)
            value = await self.scorer.score(method, task, model, version, path, label, dict(doc.get("params") or {}))
            if job_id in self._cancelled:
                return
            await self.store.set_score(image.image_id, method.score_key, value, version)
            await self.store.update_info(image.image_id, {version_key(method.score_key): version})
            progress["scored"] += 1
            self.images[(method_name, "scored")] += 1
        except asyncio.CancelledError:
            raise
        except NotFound as error:
            if error.reason not in GONE_REASONS:
                await self._image_failed(job_id, method_name, image, error.message, progress)
                return
            # Deleted (or, for Dice, unlabeled) since the job listed it: nothing left to score.
            progress["skipped"] += 1
            self.images[(method_name, "skipped")] += 1
            await self.jobs.log(job_id, f"image {image.image_id}: skipped, {error.message}")
        except Exception as error:  # noqa: BLE001 - one bad image must not end the run
            message = error.message if isinstance(error, LabelgridError) else f"{type(error).__name__}: {error}"
            await self._image_failed(job_id, method_name, image, message, progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def _image_failed(
        self, job_id: str, method_name: str, image: ImageEntry, message: str, progress: dict[str, int]
    ) -> None:
        progress["failed"] += 1
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
