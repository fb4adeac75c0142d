"""Job queues are bounded: one scoring or batch job over max_queued is RESOURCE_EXHAUSTED
(QUEUE_FULL, the gateway's 429), and nothing is recorded for it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from labelgrid.activelearning.v1 import activelearning_service_pb2 as pb
from labelgrid.activelearning.v1 import resources_pb2 as res
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb

from services.activelearning.settings import ActiveLearningSettings
from services.common.errors import ResourceExhausted
from services.common.jobs import JobStore
from services.common.settings import parse_settings
from services.infer.api.servicer import build_batch
from services.infer.domain.batch import MAX_QUEUED as BATCH_MAX_QUEUED
from services.infer.domain.batch import BatchInference, BatchJob
from services.infer.domain.model import InferParams
from services.infer.settings import InferSettings
from tests.fixtures.activelearning import start_stack, stop_stack
from tests.fixtures.hostile import nifti, upload_messages
from tests.fixtures.polling import eventually
from tests.unit.test_batch_domain import GatedInference, Images, Records

pytestmark = pytest.mark.timeout(120)


async def test_batch_queue_is_bounded() -> None:
    assert BATCH_MAX_QUEUED >= 8
    inference = GatedInference(slots=1)
    batch = BatchInference(inference, Images(), JobStore(Records(), "batchInferenceJobs", BatchJob), max_queued=3)  # type: ignore[arg-type]
    running = await batch.create("seg", InferParams())
    await eventually(lambda: inference.in_flight > 0, "the first job to run", timeout=10)
    queued = [await batch.create("seg", InferParams(), enqueue=True) for _ in range(3)]
    with pytest.raises(ResourceExhausted, match="limit is 3") as caught:
        await batch.create("seg", InferParams(), enqueue=True)
    assert caught.value.reason == "QUEUE_FULL"
    assert len(await batch.store.list()) == 4  # nothing recorded for the refused one
    await batch.cancel(queued[0].job_id)  # a place frees up
    await batch.create("seg", InferParams(), enqueue=True)
    for job in [running, *queued[1:]]:
        await batch.cancel(job.job_id)
    inference.gate.set()
    await batch.close()


def test_queue_limits_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ActiveLearningSettings().max_queued_scoring_jobs == 32
    assert InferSettings().max_queued_batch_jobs == BATCH_MAX_QUEUED == 32
    assert parse_settings(ActiveLearningSettings, ["--max-queued-scoring-jobs", "7"]).max_queued_scoring_jobs == 7
    monkeypatch.setenv("LABELGRID_MAX_QUEUED_BATCH_JOBS", "5")
    settings = parse_settings(InferSettings, [])
    assert settings.max_queued_batch_jobs == 5
    batch = build_batch(settings, GatedInference(slots=1), None, None)  # type: ignore[arg-type]
    assert batch.max_queued == 5
    for bad in ("0", "-1", "10001"):
        with pytest.raises(SystemExit):
            parse_settings(InferSettings, ["--max-queued-batch-jobs", bad])


async def test_scoring_queue_is_bounded(tmp_path: Path) -> None:
    stack = await start_stack(tmp_path, max_queued_scoring_jobs=2)  # the setting (flag / env) reaches the queue
    try:
        # Six images at 64 passes each keep the first job running (seconds) while the test queues.
        data = nifti((32, 32, 32))
        for index in range(6):
            header = ds_pb.UploadImageHeader(image_id=f"q{index}", file_name=f"q{index}.nii.gz", size_bytes=len(data))
            await stack.ds_stub.UploadImage(upload_messages("datastore", header, data), timeout=30)

        async def create(enqueue: bool) -> res.ScoringJob:
            job = res.ScoringJob(method="scoringMethods/epistemic", params=None)
            job.params.update({"passes": 64})
            answer = await stack.stub.CreateScoringJob(
                pb.CreateScoringJobRequest(scoring_job=job, enqueue=enqueue), timeout=30
            )
            return answer.scoring_job

        jobs = [await create(False), await create(True), await create(True)]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(True)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
        assert "the limit is 2" in (caught.value.details() or "")
        listed = await stack.stub.ListScoringJobs(pb.ListScoringJobsRequest(), timeout=30)
        assert len(listed.scoring_jobs) == 3
        for job in jobs:
            await stack.stub.CancelScoringJob(pb.CancelScoringJobRequest(name=job.name), timeout=30)
    finally:
        await stop_stack(stack)
