"""The training child's events: one schema both sides use, and what the service does with them."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import pytest

from services.common.jobs import SUCCEEDED, JobStore
from services.train.adapters.worker import _file_emitter
from services.train.domain import events
from services.train.domain.devices import DevicePool
from services.train.domain.job import TrainingJob
from services.train.domain.training import JobRequest, Training


def test_what_the_child_writes_the_service_reads_back(tmp_path: Path) -> None:
    written = [
        events.Started(train_items=3, val_items=1),
        events.Iteration(epoch=1, iteration=2, epoch_length=4, max_epochs=2, loss=None, elapsed_seconds=1.5),
        events.Epoch(
            epoch=1, metric_name="val_mean_dice", metric=0.5, stats={"epoch": 1, "eval": {"best_metric": 0.5}}
        ),
        events.Checkpoint(path="/x/model_epoch0001.pt", metric_name="val_mean_dice", metric=0.5, epoch=1),
        events.Completed(stats={"total_time": "0:00:03"}),
    ]
    emit = _file_emitter(str(tmp_path / "events.jsonl"))
    for event in written:
        emit(event)
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [events.parse(json.loads(line)) for line in lines] == written


@pytest.mark.parametrize(
    "data",
    [
        {"type": "iteration", "iteration": "many"},
        {"type": "iteration", "epoch": [1]},
        {"type": "epoch", "stats": "not an object"},
        {"type": "checkpoint", "epoch": float("inf")},
        {"type": "no such event"},
        ["not", "an", "object"],
    ],
)
def test_a_malformed_or_unknown_event_is_skipped(data: Any) -> None:
    assert events.parse(data) is None


def test_missing_fields_take_their_defaults_and_unknown_keys_are_ignored() -> None:
    assert events.parse({"type": "started", "ts": 1.0, "extra": True}) == events.Started()


class Records:
    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    async def put_record(self, kind: str, record_id: str, data: dict[str, Any], expected_revision: int = 0) -> int:
        self.data[record_id] = dict(data)
        return 1

    async def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None:
        return self.data.get(record_id)

    async def list_records(self, kind: str) -> list[dict[str, Any]]:
        return list(self.data.values())


class Data:
    held = 0  # datalists handed to jobs and not released

    async def labeled_datalist(self, tag: str, log: Any) -> list[dict[str, str]]:
        self.held += 1
        return [{"image": "a", "label": "b", "image_id": "a"}]

    def release(self, datalist: list[dict[str, str]]) -> None:
        self.held -= len(datalist)


class Trainer:
    config: ClassVar[dict[str, Any]] = {"max_epochs": 2, "val_split": 0.0}
    description = "fake"

    def info(self) -> dict[str, Any]:
        return {"config": self.config, "description": self.description}


class Proc:
    pid = 4242

    def __init__(self) -> None:
        self.done = asyncio.Event()

    async def wait(self) -> int:
        await self.done.wait()
        return 0

    async def stop(self, grace_seconds: float) -> None:
        self.done.set()


class ScriptedLauncher:
    """A child that reports `script` and exits 0."""

    def __init__(self, script: list[events.Event]) -> None:
        self.script = script

    async def start(self, job_dir: Path, spec: dict[str, Any], devices: list[str], on_line: Any, on_event: Any) -> Proc:
        proc = Proc()

        async def run() -> None:
            for event in self.script:
                on_event(event)
                await asyncio.sleep(0)
            proc.done.set()

        self.task = asyncio.create_task(run())
        return proc


class Datastore:
    def __init__(self, fail: bool = False) -> None:
        self.uploads: list[tuple[str, Path, dict[str, Any]]] = []
        self.fail = fail

    async def serving_version(self, model: str) -> str | None:
        return None

    async def model_version_exists(self, model: str, version: str) -> bool:
        return False

    async def upload_model_version(
        self, model: str, path: Path, *, metrics: dict[str, Any], info: dict[str, Any], version: str = ""
    ) -> Any:
        if self.fail:
            raise RuntimeError("the datastore broke in an unexpected way")
        self.uploads.append((model, path, metrics))
        return type("Version", (), {"name": f"models/{model}/versions/{len(self.uploads)}"})()


def training(tmp_path: Path, launcher: Any, datastore: Datastore) -> Training:
    return Training(
        trainers={"seg": Trainer()},
        store=JobStore(Records(), "trainingJobs", TrainingJob),
        datastore=datastore,  # type: ignore[arg-type]
        data=Data(),
        launcher=launcher,
        pool=DevicePool(["cpu"]),
        work_dir=tmp_path,
        app_module="apps.radiology",
    )


async def wait_ended(t: Training, job_id: str) -> TrainingJob:
    async for job in t.watch(job_id):
        if job.state.final:
            return job
    raise AssertionError("the watch ended without a final state")


async def test_events_become_progress_stats_and_a_published_version(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model_epoch0002.pt"
    checkpoint.write_bytes(b"weights")
    stats = {"epoch": 2, "total_epochs": 2, "current_iteration": 8, "total_iterations": 8,
             "eval": {"key_metric_name": "dice", "metrics": {"dice": 0.75}, "best_metric": 0.75, "best_metric_epoch": 2}}  # fmt: skip
    launcher = ScriptedLauncher([
        events.Started(train_items=2, val_items=1),
        events.Iteration(epoch=1, iteration=4, epoch_length=4, max_epochs=2, loss=0.9, elapsed_seconds=1.0),
        events.Checkpoint(path=str(checkpoint), metric_name="dice", metric=0.75, epoch=2),
        events.Completed(stats=stats),
    ])  # fmt: skip
    datastore = Datastore()
    t = training(tmp_path, launcher, datastore)
    job = await t.create(JobRequest("seg", {}))
    done = await asyncio.wait_for(wait_ended(t, job.job_id), 10)
    assert done.state == SUCCEEDED
    assert datastore.uploads == [
        ("seg", checkpoint, {"best_metric": 0.75, "best_metric_epoch": 2, "key_metric_name": "dice"})
    ]
    assert done.model_version == "models/seg/versions/1"
    assert done.train_stats == stats
    progress = done.progress
    assert progress is not None
    assert (progress.epoch, progress.iteration, progress.total_iterations) == (2, 8, 8)
    assert (progress.metric_name, progress.metric, progress.best_metric_epoch) == ("dice", 0.75, 2)
    assert progress.loss == 0.9 and progress.estimated_remaining_seconds == 0.0
    assert "training on 2 image(s), validating on 1" in done.log_tail
    assert t.published == {"seg": 1} and not t.last_progress
    await t.close()


async def test_a_failing_background_task_is_logged_not_lost(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    checkpoint = tmp_path / "model_epoch0001.pt"
    checkpoint.write_bytes(b"weights")
    launcher = ScriptedLauncher([events.Checkpoint(path=str(checkpoint), metric_name="dice", metric=0.5, epoch=1)])
    t = training(tmp_path, launcher, Datastore(fail=True))
    with caplog.at_level(logging.ERROR, logger="labelgrid.tasks"):
        job = await t.create(JobRequest("seg", {}))
        done = await asyncio.wait_for(wait_ended(t, job.job_id), 10)
    # The upload's error fails the job (as before) and is logged with its traceback.
    assert done.state == "FAILED" and done.error is not None and "the datastore broke" in done.error.message
    failures = [r for r in caplog.records if "background task" in r.getMessage()]
    assert failures and failures[0].exc_info is not None
    await t.close()


def test_the_eta_extrapolates_the_rate_since_the_first_step() -> None:
    from services.train.domain.running import Progress, iteration_progress, stats_progress

    step = events.Iteration(epoch=1, iteration=30, epoch_length=10, max_epochs=10, loss=0.5, elapsed_seconds=3.0)
    # 20 iterations in 10 s since the first step at iteration 10: 70 left take 35 s.
    progress = iteration_progress(Progress(metric_name="dice", metric=0.4), step, (100.0, 10), 110.0)
    assert progress.estimated_remaining_seconds == 35.0
    assert (progress.total_iterations, progress.loss, progress.metric_name, progress.metric) == (100, 0.5, "dice", 0.4)
    assert iteration_progress(None, step, (100.0, 30), 100.0).estimated_remaining_seconds == 0.0
    done = stats_progress(
        progress, events.Completed(stats={"epoch": 10, "train": {"key_metric_name": "acc", "metrics": {"acc": 0.9}}})
    )
    assert (done.epoch, done.metric_name, done.metric, done.estimated_remaining_seconds, done.loss) == (
        10,
        "acc",
        0.9,
        0.0,
        0.5,
    )
