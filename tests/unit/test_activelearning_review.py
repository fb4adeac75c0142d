"""Review fixes of the active learning service: odd input at the gateway, scoring jobs that
meet deleted images or cancels, the SDK's no-sample reason."""

from __future__ import annotations

import pytest

from gateway.errors import GatewayError
from gateway.routes.activelearning import _ttl


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e300, 2**31, 10**400, -(2**40)])
def test_gateway_refuses_non_finite_and_huge_lease_ttls_with_a_4xx(value: object) -> None:
    with pytest.raises(GatewayError) as err:
        _ttl({"lease_ttl_seconds": value})
    assert err.value.status in (400, 422)


def test_gateway_passes_ordinary_lease_ttls() -> None:
    assert _ttl({"lease_ttl_seconds": 60}) == 60 and _ttl({"lease_ttl_seconds": 60.0}) == 60 and _ttl({}) == 0


# -- scoring jobs with fakes around the domain -------------------------------------------------

import asyncio  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, ClassVar  # noqa: E402

from apps.api.activelearning import ScoringMethod  # noqa: E402
from services.activelearning.domain.model import ImageEntry, ScoringJob, ScoringProgress  # noqa: E402
from services.activelearning.domain.scoring import ScoringJobs  # noqa: E402
from services.common.errors import NotFound, Unavailable  # noqa: E402
from services.common.jobs import JobState, JobStore  # noqa: E402
from tests.fixtures.polling import eventually  # noqa: E402


class Records:
    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}
        self.fail = False

    async def put_record(self, kind: str, record_id: str, data: dict[str, Any], expected_revision: int = 0) -> int:
        if self.fail:
            raise Unavailable("the datastore is down")
        self.data[record_id] = dict(data)
        return 1

    async def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None:
        return self.data.get(record_id)

    async def list_records(self, kind: str) -> list[dict[str, Any]]:
        return list(self.data.values())


class Method(ScoringMethod):
    model = "seg"
    score_key = "s"


class App:
    def __init__(self) -> None:
        self.scoring_methods = {"m": Method()}
        self.infer_tasks = {"seg": object()}

    def lookup(self, kind: str, name: str) -> Any:
        table = getattr(self, kind)
        if name not in table:
            raise NotFound(f"{name} does not exist")
        return table[name]


class Store:
    """Three unlabeled images; `gone` are deleted by the time they are downloaded or scored."""

    def __init__(self, gone: set[str], gone_at: str = "download") -> None:
        self.gone, self.gone_at = gone, gone_at
        self.scores: dict[str, float] = {}

    async def serving_version(self, model: str) -> str | None:
        return None

    async def images(self, labeled: bool, label_tag: str) -> list[ImageEntry]:
        return [ImageEntry(i, f"{i}.nii.gz", "", {}, {}) for i in ("a", "b", "c")]

    def _check(self, image_id: str, where: str) -> None:
        if image_id in self.gone and self.gone_at == where:
            raise NotFound(f"image {image_id!r} does not exist", reason="IMAGE_NOT_FOUND")

    async def download_image(self, image_id: str, dest_dir: Path) -> Path:
        self._check(image_id, "download")
        path = dest_dir / f"{image_id}.nii.gz"
        path.write_bytes(b"x")
        return path

    async def set_score(self, image_id: str, key: str, value: float, model_version: str) -> None:
        self._check(image_id, "score")
        self.scores[image_id] = value

    async def update_info(self, image_id: str, info: dict[str, Any]) -> None:
        self._check(image_id, "info")


class Scorer:
    devices: ClassVar[list[str]] = ["cpu"]

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None

    async def score(
        self, method: Any, task: Any, model: str, version: str, image: Path, label: Any, params: Any
    ) -> float:
        if self.gate is not None:
            await self.gate.wait()
        return 0.5

    def close(self) -> None:
        pass


def idle(jobs: ScoringJobs) -> bool:
    """The runner has nothing queued and runs nothing."""
    return not jobs._queue and jobs._running is None


async def run_job(jobs: ScoringJobs) -> ScoringJob:
    created = await jobs.create("m")

    async def ended() -> ScoringJob | None:
        job = await jobs.get(created.job_id)
        return job if job.state.final else None

    return await eventually(ended, "the job to end", timeout=10)


def scoring(tmp_path: Path, store: Store, records: Records | None = None, scorer: Scorer | None = None) -> ScoringJobs:
    jobs = JobStore(records or Records(), "scoringJobs", ScoringJob)
    return ScoringJobs(App(), store, jobs, scorer or Scorer(), tmp_path)  # type: ignore[arg-type]


@pytest.mark.parametrize("gone_at", ["download", "score", "info"])
async def test_images_deleted_mid_scoring_are_skipped_not_failed(tmp_path: Path, gone_at: str) -> None:
    store = Store({"b"}, gone_at)
    jobs = scoring(tmp_path, store)
    await jobs.start()
    try:
        doc = await run_job(jobs)
    finally:
        await jobs.stop()
    assert doc.state == JobState.SUCCEEDED, doc
    assert doc.progress == ScoringProgress(total=3, scored=2, skipped=1, failed=0)
    assert not list(tmp_path.iterdir()), "scratch directories were left behind"


async def test_a_job_whose_images_were_all_deleted_succeeds_with_nothing_scored(tmp_path: Path) -> None:
    jobs = scoring(tmp_path, Store({"a", "b", "c"}))
    await jobs.start()
    try:
        doc = await run_job(jobs)
    finally:
        await jobs.stop()
    assert doc.state == JobState.SUCCEEDED and doc.progress == ScoringProgress(total=3, skipped=3), doc


class SlowStore(Store):
    """Lists images only once `gate` opens, then fails (the datastore went away)."""

    def __init__(self) -> None:
        super().__init__(set())
        self.gate = asyncio.Event()
        self.listing = asyncio.Event()

    async def images(self, labeled: bool, label_tag: str) -> list[ImageEntry]:
        self.listing.set()
        await self.gate.wait()
        raise Unavailable("the datastore is down")


async def test_a_cancelled_job_stays_cancelled_when_its_run_then_fails(tmp_path: Path) -> None:
    store = SlowStore()
    jobs = scoring(tmp_path, store)
    await jobs.start()
    try:
        doc = await jobs.create("m")
        await asyncio.wait_for(store.listing.wait(), 5)
        assert (await jobs.cancel(doc.job_id)).state == JobState.CANCELLED
        store.gate.set()
        await eventually(lambda: idle(jobs), "the runner to finish the job's run", timeout=10)
        after = await jobs.get(doc.job_id)
    finally:
        await jobs.stop()
    assert after.state == JobState.CANCELLED and after.error is None, after


async def test_a_job_is_not_left_running_when_the_datastore_refuses_its_state_change(tmp_path: Path) -> None:
    records = Records()
    jobs = scoring(tmp_path, Store(set()), records)
    await jobs.start()
    try:
        await jobs.taken_over
        doc = await jobs.create("m")
        records.fail = True  # the runner's first write (QUEUED -> RUNNING) fails
        await eventually(lambda: idle(jobs), "the runner to give the job up", timeout=10)
        after = await jobs.get(doc.job_id)
    finally:
        records.fail = False
        await jobs.stop()
    assert after.state == JobState.FAILED and after.error is not None and after.error.reason, after


# -- next sample -----------------------------------------------------------------------------

from datetime import datetime  # noqa: E402

from apps.api.activelearning import First  # noqa: E402
from services.activelearning.domain.model import Acquired, Lease  # noqa: E402
from services.activelearning.domain.next_sample import NextSampler  # noqa: E402


class LeaseStore:
    """Hands out "a" then "b"; "a" is deleted right after its lease."""

    def __init__(self) -> None:
        self.free = ["a", "b"]

    async def acquire(
        self, client_id: str, strategy: str, order: str, score_key: str, label_tag: str, ttl: int
    ) -> Acquired:
        if not self.free:
            return Acquired(no_image_reason="ALL_LEASED")
        image_id = self.free.pop(0)
        now = datetime.now()
        return Acquired(ImageEntry(image_id, image_id, "", {}, {}), Lease(image_id, client_id, strategy, now, now))

    async def update_info(self, image_id: str, info: dict[str, Any]) -> None:
        if image_id == "a":
            raise NotFound(f"image {image_id!r} not found", reason="IMAGE_NOT_FOUND")


async def test_an_image_deleted_right_after_its_lease_is_replaced_by_the_next_one() -> None:
    app = App()
    app.strategies = {"first": First()}  # type: ignore[attr-defined]
    sampler = NextSampler(app, LeaseStore(), 60)  # type: ignore[arg-type]
    result = await sampler.next_sample("first", "annotator", {})
    assert result.image is not None and result.image.image_id == "b", result
