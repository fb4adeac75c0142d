"""services.common: the shared datastore client and JobStore against a real datastore (local
folder + SQLite, in-process): records, model versions, job lifecycle, watchers, recovery."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from services.common import jobs
from services.common.datastore_client import DatastoreClient
from services.common.errors import ErrorKind, LabelgridError
from tests.fixtures.datastore import local_datastore_client
from tests.fixtures.polling import eventually


@pytest.fixture
async def client(tmp_path: Path):
    async with local_datastore_client(tmp_path / "studies") as client:
        yield client


async def test_records_round_trip_and_conditional_write(client: DatastoreClient) -> None:
    assert await client.get_record("things", "a") is None
    revision = await client.put_record(
        "things", "a", {"n": 1, "nested": {"x": [1, 2]}, "none": None}, expected_revision=-1
    )
    assert await client.get_record("things", "a") == {"n": 1, "nested": {"x": [1, 2]}, "none": None}
    with pytest.raises(LabelgridError) as refused:
        await client.put_record("things", "a", {"n": 2}, expected_revision=-1)
    assert refused.value.kind is ErrorKind.ABORTED
    await client.put_record("things", "a", {"n": 3}, expected_revision=revision)
    await client.put_record("things", "b", {"n": 4})
    assert await client.list_records("things") == [{"n": 3}, {"n": 4}]
    await client.delete_record("things", "a")
    assert await client.list_records("things") == [{"n": 4}]


async def test_model_version_upload_and_download(client: DatastoreClient, tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights" * 300_000)  # > 1 MiB: several chunks
    version = await client.upload_model_version("seg", weights, metrics={"best_metric": 0.5}, info={"job": "j1"})
    assert version.version and version.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert await client.serving_version("seg") == version.version
    out = tmp_path / "out"
    out.mkdir()
    fetched = await client.download_model_version("seg", version.version, out)
    assert fetched.read_bytes() == weights.read_bytes()


class DemoJob(jobs.Job):
    trainer: str = ""
    progress: dict[str, int] | None = None


async def test_job_lifecycle_is_stored_and_watched(client: DatastoreClient) -> None:
    store = jobs.JobStore(client, "testJobs", DemoJob, progress_interval=3600)
    job, created = await store.create(DemoJob(trainer="seg"), request_id="r1")
    again, created_again = await store.create(DemoJob(trainer="seg"), request_id="r1")
    assert created and not created_again and again.job_id == job.job_id

    seen: list[DemoJob] = []

    async def watch() -> None:
        async for doc in store.watch(job.job_id):
            seen.append(doc)

    watcher = asyncio.create_task(watch())
    await eventually(lambda: seen, "the watcher's first answer")
    await store.update(job.job_id, {"state": jobs.RUNNING})
    await store.update(job.job_id, {"progress": {"epoch": 1}}, persist=False)
    # A throttled tick is visible here at once but not yet stored.
    assert (await store.get(job.job_id)).progress == {"epoch": 1}
    assert (await client.get_record("testJobs", job.job_id) or {}).get("progress") is None
    await store.log(job.job_id, *[f"line {i}" for i in range(80)])
    # 50 tracebacks of 5,000 characters would outgrow the datastore's 64 KiB record cap: clipped.
    await store.log(job.job_id, *[f"long {i} " + "x" * 5000 for i in range(49)], "line 79")
    await store.update(job.job_id, {"state": jobs.SUCCEEDED})
    await asyncio.wait_for(watcher, 5)

    assert seen[0].state == jobs.QUEUED and seen[-1].state == jobs.SUCCEEDED
    stored = await client.get_record("testJobs", job.job_id)
    assert stored is not None and stored["progress"] == {"epoch": 1}
    assert stored["start_time"] and stored["end_time"]
    assert stored["log_tail"][-1] == "line 79" and len(stored["log_tail"]) == jobs.LOG_TAIL_LINES
    assert {len(line) for line in stored["log_tail"][:-1]} == {jobs.LOG_LINE_CHARS}
    assert stored["log_tail"][0].startswith("long 0 ") and stored["log_tail"][0].endswith("...")
    # The record is the model's JSON: a new process reads back the same job.
    assert DemoJob.from_record(stored) == await store.get(job.job_id)


async def test_a_restarted_store_fails_the_jobs_it_lost(client: DatastoreClient) -> None:
    first = jobs.JobStore(client, "testJobs", DemoJob)
    running, _ = await first.create(DemoJob())
    await first.update(running.job_id, {"state": jobs.RUNNING})
    queued, _ = await first.create(DemoJob())
    done, _ = await first.create(DemoJob())
    await first.update(done.job_id, {"state": jobs.CANCELLED})

    second = jobs.JobStore(client, "testJobs", DemoJob)  # a new process: nothing in memory
    lost = await second.recover()
    assert {job.job_id for job in lost} == {running.job_id, queued.job_id}
    listed = {job.job_id: job for job in await second.list()}
    lost_running = listed[running.job_id]
    assert lost_running.state == jobs.FAILED and lost_running.error is not None
    assert lost_running.error.reason == "SERVER_ERROR" and "restarted" in lost_running.error.message
    assert listed[done.job_id].state == jobs.CANCELLED
    assert (await second.list())[0].job_id == done.job_id  # newest first
    with pytest.raises(LabelgridError) as missing:
        await second.get("no-such-job")
    assert missing.value.kind is ErrorKind.NOT_FOUND and missing.value.reason == "RECORD_NOT_FOUND"


async def test_watchers_get_progress_at_most_once_per_interval_but_every_state(client: DatastoreClient) -> None:
    store = jobs.JobStore(client, "testJobs", DemoJob)
    job, _ = await store.create(DemoJob())
    await store.update(job.job_id, {"state": jobs.RUNNING})
    seen: list[DemoJob] = []

    async def watch() -> None:
        async for doc in store.watch(job.job_id, min_interval=0.5):
            seen.append(doc)

    watcher = asyncio.create_task(watch())
    await eventually(lambda: seen, "the watcher's first answer")
    # Twenty ticks back to back (no I/O: well within one interval), each one giving the watcher a turn.
    for step in range(20):
        await store.update(job.job_id, {"progress": {"iteration": step}}, persist=False)
        await asyncio.sleep(0)
    await store.update(job.job_id, {"state": jobs.SUCCEEDED})
    await asyncio.wait_for(watcher, 5)
    running = [doc for doc in seen if doc.state == jobs.RUNNING]
    assert 1 <= len(running) <= 2, [doc.progress for doc in running]
    assert seen[-1].state == jobs.SUCCEEDED and seen[-1].progress == {"iteration": 19}
