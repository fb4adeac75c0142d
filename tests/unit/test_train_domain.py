"""The training use cases over in-memory fakes: stop races, param bounds, child process groups."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from services.common.errors import InvalidArgument
from services.common.jobs import CANCELLED, QUEUED, JobStore
from services.train.api import convert
from services.train.domain.devices import DevicePool
from services.train.domain.job import TrainingJob
from services.train.domain.params import MAX_BATCH_SIZE, MAX_EPOCHS
from services.train.domain.running import Progress
from services.train.domain.training import JobRequest, Training
from tests.fixtures.polling import eventually


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


class Datastore:
    async def serving_version(self, model: str) -> str | None:
        return None

    async def model_version_exists(self, model: str, version: str) -> bool:
        return False


class Data:
    held = 0  # datalists handed to jobs and not released

    async def labeled_datalist(self, tag: str, log: Any) -> list[dict[str, str]]:
        self.held += 1
        return [{"image": "a", "label": "b", "image_id": "a"}]

    def release(self, datalist: list[dict[str, str]]) -> None:
        self.held -= len(datalist)


class Proc:
    pid = 4242

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.stopped = False

    async def wait(self) -> int:
        await self.done.wait()
        return -15 if self.stopped else 0

    async def stop(self, grace_seconds: float) -> None:
        self.stopped = True
        self.done.set()


class SlowLauncher:
    """A launcher whose start takes a moment (spawning a child does): `held` keeps it starting until `release` is set."""

    def __init__(self, held: bool = False) -> None:
        self.starting = asyncio.Event()
        self.release = asyncio.Event()
        if not held:
            self.release.set()
        self.procs: list[Proc] = []

    async def start(self, job_dir: Path, spec: dict[str, Any], devices: list[str], on_line: Any, on_event: Any) -> Proc:
        self.starting.set()
        await self.release.wait()
        proc = Proc()
        self.procs.append(proc)
        return proc


class Trainer:
    config: ClassVar[dict[str, Any]] = {"max_epochs": 5, "val_split": 0.2, "early_stop_patience": -1}
    description = "fake"

    def info(self) -> dict[str, Any]:
        return {"config": self.config, "description": self.description}


def training(tmp_path: Path, launcher: Any) -> Training:
    return Training(
        trainers={"seg": Trainer()},
        store=JobStore(Records(), "trainingJobs", TrainingJob),
        datastore=Datastore(),  # type: ignore[arg-type]
        data=Data(),
        launcher=launcher,
        pool=DevicePool(["cpu"]),
        work_dir=tmp_path,
        app_module="apps.radiology",
        stop_grace_seconds=0.1,
    )


async def test_a_stop_while_the_child_is_being_started_stops_it(tmp_path: Path) -> None:
    launcher = SlowLauncher(held=True)
    t = training(tmp_path, launcher)
    job = await t.create(JobRequest("seg", {}))
    await asyncio.wait_for(launcher.starting.wait(), 5)
    cancel = asyncio.create_task(t.cancel(job.job_id))
    # The stop has reached the job while its child is still being started; only now does the start end.
    await eventually(lambda: t._jobs[job.job_id].stop_requested, "the stop to reach the starting job", timeout=5)
    launcher.release.set()
    done = await asyncio.wait_for(cancel, 5)
    assert done.state == CANCELLED
    assert launcher.procs and launcher.procs[0].stopped
    assert t.data.held == 0  # type: ignore[attr-defined]  # the job's files may leave the cache
    await t.close()


async def test_a_cancelled_queued_job_leaves_nothing_behind(tmp_path: Path) -> None:
    launcher = SlowLauncher()
    t = training(tmp_path, launcher)
    first = await t.create(JobRequest("seg", {}))
    second = await t.create(JobRequest("seg", {}, enqueue=True))
    assert second.state == QUEUED and second.queue_position == 1
    assert (await t.cancel(second.job_id)).state == CANCELLED
    assert second.job_id not in t._jobs
    await t.cancel(first.job_id)
    await t.close()


@pytest.mark.parametrize(
    ("key", "highest"),
    [("max_epochs", MAX_EPOCHS), ("train_batch_size", MAX_BATCH_SIZE), ("val_batch_size", MAX_BATCH_SIZE),
     ("early_stop_patience", MAX_EPOCHS)],
)  # fmt: skip
async def test_int_params_out_of_range_are_invalid(tmp_path: Path, key: str, highest: int) -> None:
    t = training(tmp_path, SlowLauncher())
    for value in (highest + 1, 2**31):
        with pytest.raises(InvalidArgument, match=key):
            await t.create(JobRequest("seg", {key: value}))
    # In range: accepted, and the job converts to its proto.
    job = await t.create(JobRequest("seg", {key: highest}))
    convert.job(job.model_copy(update={"progress": Progress(total_epochs=job.resolved_params["max_epochs"])}))
    await t.cancel(job.job_id)
    await t.close()


async def test_the_childs_process_group_is_killed_once_it_exits(tmp_path: Path) -> None:
    from services.train.adapters.process import ChildRun

    pid_file = tmp_path / "pid"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        f"import subprocess,sys; p=subprocess.Popen(['sleep','60']); open({str(pid_file)!r},'w').write(str(p.pid)); sys.exit(3)",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    run = ChildRun(proc, tmp_path, tmp_path / "events.jsonl", lambda line: None, lambda event: None)
    assert await asyncio.wait_for(run.wait(), 10) == 3
    orphan = int(pid_file.read_text())

    def orphan_gone() -> bool:
        try:
            os.kill(orphan, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        await eventually(orphan_gone, "the process the child started to be killed with it", timeout=5)
    except AssertionError:
        os.kill(orphan, signal.SIGKILL)
        raise


def test_a_json_number_too_big_for_a_struct_is_a_422() -> None:
    from gateway.errors import GatewayError
    from gateway.routes.common import to_struct

    with pytest.raises(GatewayError) as caught:
        to_struct({"max_epochs": 10**400})
    assert caught.value.status == 422


async def test_close_stops_every_job_even_when_one_ends_meanwhile(tmp_path: Path) -> None:
    launcher = SlowLauncher()
    t = training(tmp_path, launcher)
    running = await t.create(JobRequest("seg", {}))
    await t.create(JobRequest("seg", {}, enqueue=True))
    await t.create(JobRequest("seg", {}, enqueue=True))
    await eventually(lambda: launcher.procs, "the running job's child to start", timeout=10)
    running_task = t._jobs[running.job_id].task
    assert running_task is not None
    records = t.store.records
    put = records.put_record

    async def slow_put(kind: str, record_id: str, data: dict[str, Any], expected_revision: int = 0) -> int:
        if data.get("state") == "FAILED" and record_id != running.job_id:
            launcher.procs[0].done.set()  # the running job ends just now, while a queued job's end is written
            await eventually(running_task.done, "the running job to end", timeout=10)
        return await put(kind, record_id, data, expected_revision)

    records.put_record = slow_put  # type: ignore[method-assign]
    await asyncio.wait_for(t.close(), 10)
    assert not t._jobs and not t._queue
    states = {doc.state for doc in await t.store.list()}
    assert states <= {"SUCCEEDED", "FAILED"}, states


async def test_two_starts_at_once_without_enqueue_start_one_job(tmp_path: Path) -> None:
    from services.common.errors import AlreadyExists

    t = training(tmp_path, SlowLauncher())
    records = t.store.records
    put = records.put_record

    async def slow_put(kind: str, record_id: str, data: dict[str, Any], expected_revision: int = 0) -> int:
        # Slow on purpose, as a database round trip is: it widens the window between the check and the write.
        await asyncio.sleep(0.05)
        return await put(kind, record_id, data, expected_revision)

    records.put_record = slow_put  # type: ignore[method-assign]
    results = await asyncio.gather(*[t.create(JobRequest("seg", {})) for _ in range(2)], return_exceptions=True)
    assert sum(isinstance(r, AlreadyExists) for r in results) == 1, results
    for job in await t.list():
        if job.state in ("QUEUED", "RUNNING"):
            await t.cancel(job.job_id)
    await t.close()
