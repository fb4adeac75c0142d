"""Scoring jobs of the active learning service against a real datastore: real torch scoring
with the sample app's models, scores stored in the datastore, restarts mid-run."""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Any

import grpc
import nibabel as nib
import numpy as np
import pytest
import torch
from labelgrid.activelearning.v1 import activelearning_service_pb2 as pb
from labelgrid.activelearning.v1 import activelearning_service_pb2_grpc as pb_grpc
from labelgrid.activelearning.v1 import resources_pb2 as res
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as ds

from services.activelearning.service import start_service
from services.common.apps import load_app
from services.datastore.sample_studies import synthetic_volume
from tests.contract.helpers import (
    error_reason,
    struct,
    upload_image,
    upload_label,
    upload_model,
)
from tests.fixtures.activelearning import Stack, start_stack, stop_stack
from tests.fixtures.polling import eventually

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SIZE = 32
FINAL = (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED)


def nifti(data: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(data, AFFINE).to_bytes(), compresslevel=1, mtime=0)


def clean_and_noisy(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An in-distribution volume from the sample studies' generator, the same volume drowned in
    noise (out of distribution), and the clean one's label."""
    rng = np.random.default_rng(seed)
    image, label = synthetic_volume(rng, SIZE)
    noisy = image + rng.normal(0.0, 1.0, image.shape).astype(np.float32)
    return image, noisy, label


async def create(stub: pb_grpc.ActiveLearningServiceStub, method: str, **fields: Any) -> res.ScoringJob:
    enqueue = fields.pop("enqueue", False)
    params = fields.pop("params", None)
    job = res.ScoringJob(method=f"scoringMethods/{method}", params=struct(params), **fields)
    response = await stub.CreateScoringJob(pb.CreateScoringJobRequest(scoring_job=job, enqueue=enqueue))
    return response.scoring_job


async def finished(stub: pb_grpc.ActiveLearningServiceStub, job: res.ScoringJob) -> res.ScoringJob:
    last = job
    async for message in stub.WatchScoringJob(pb.WatchScoringJobRequest(name=job.name), timeout=240):
        last = message.scoring_job
    assert last.state in FINAL, last
    return last


async def scores(stack: Stack, key: str) -> dict[str, float]:
    listing = await stack.ds_stub.ListImages(ds.ListImagesRequest(page_size=100))
    return {image.image_id: image.scores[key] for image in listing.images if key in image.scores}


@pytest.fixture
async def stack(tmp_path: Path):
    running = await start_stack(tmp_path)
    yield running
    await stop_stack(running)


async def test_epistemic_ranks_the_noisy_volume_above_the_clean_one_and_rescored_per_version(stack: Stack) -> None:
    clean, noisy, _ = clean_and_noisy(seed=3)
    await upload_image(stack.ds_stub, nifti(clean), "clean.nii.gz", "clean")
    await upload_image(stack.ds_stub, nifti(noisy), "noisy.nii.gz", "noisy")

    job = await create(stack.stub, "epistemic", params={"passes": 6})
    assert job.state in (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_RUNNING)
    done = await finished(stack.stub, job)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.log_tail
    assert (done.progress.total, done.progress.scored, done.progress.skipped) == (2, 2, 0)
    assert done.model == "models/segmentation" and done.model_version == ""  # the app's initial weights
    first = await scores(stack, "epistemic_entropy")
    assert first["noisy"] > first["clean"] > 0.0
    # MONAI Label's view: the score is in the image info too, with its time and model version.
    got = await stack.ds_stub.GetImage(ds.GetImageRequest(name="images/noisy"))
    assert got.image.info["epistemic_entropy"] == pytest.approx(first["noisy"])
    assert "epistemic_entropy_ts" in got.image.info.fields
    assert got.image.info["epistemic_entropy_model_version"] == "untrained"

    # The score-based strategy hands out the most uncertain one first.
    sample = await stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/epistemic", client_id="a"))
    assert sample.image.image_id == "noisy"
    assert sample.strategy_info["epistemic_entropy"] == pytest.approx(first["noisy"])

    # Same version again: nothing to do.
    again = await finished(stack.stub, await create(stack.stub, "epistemic", params={"passes": 6}))
    assert (again.progress.scored, again.progress.skipped) == (0, 2)

    # A new published version: every image is scored again, with it.
    network = load_app().infer_tasks["segmentation"].initial_network()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.mul_(0.9)
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    version = await upload_model(stack.ds_stub, "segmentation", buffer.getvalue())
    rescored = await finished(stack.stub, await create(stack.stub, "epistemic", params={"passes": 6}))
    assert (rescored.progress.scored, rescored.progress.skipped) == (2, 0)
    assert rescored.model_version == f"models/segmentation/versions/{version.version}"
    got = await stack.ds_stub.GetImage(ds.GetImageRequest(name="images/clean"))
    assert got.image.info["epistemic_entropy_model_version"] == version.version

    listing = await stack.stub.ListScoringJobs(pb.ListScoringJobsRequest(method="scoringMethods/epistemic"))
    assert [j.job_id for j in listing.scoring_jobs] == [rescored.job_id, again.job_id, done.job_id]  # newest first


async def test_tta_scores_unlabeled_and_dice_scores_labeled_images(stack: Stack) -> None:
    clean, noisy, label = clean_and_noisy(seed=4)
    await upload_image(stack.ds_stub, nifti(clean), "a.nii.gz", "a")
    await upload_image(stack.ds_stub, nifti(noisy), "b.nii.gz", "b")
    await upload_label(stack.ds_stub, "a", nifti(label.astype(np.uint8)))

    tta = await finished(stack.stub, await create(stack.stub, "tta"))
    assert tta.state == common_pb2.JOB_STATE_SUCCEEDED and tta.progress.total == 1
    assert set(await scores(stack, "tta_variance")) == {"b"}  # labeled images are not candidates

    dice = await finished(stack.stub, await create(stack.stub, "dice"))
    assert dice.state == common_pb2.JOB_STATE_SUCCEEDED and dice.progress.total == 1
    dice_scores = await scores(stack, "dice")
    assert set(dice_scores) == {"a"} and 0.0 <= dice_scores["a"] <= 1.0


async def test_busy_cancel_and_bad_input(stack: Stack) -> None:
    for n in range(3):
        image, _, _ = clean_and_noisy(seed=10 + n)
        await upload_image(stack.ds_stub, nifti(image), f"i{n}.nii.gz", f"i{n}")
    running = await create(stack.stub, "epistemic", params={"passes": 16})
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await create(stack.stub, "epistemic")
    assert busy.value.code() == grpc.StatusCode.ALREADY_EXISTS and error_reason(busy.value) == "ALREADY_RUNNING"
    queued = await create(stack.stub, "epistemic", enqueue=True)
    assert queued.state == common_pb2.JOB_STATE_QUEUED and queued.queue_position == 1
    cancelled = await stack.stub.CancelScoringJob(pb.CancelScoringJobRequest(name=queued.name))
    assert cancelled.scoring_job.state == common_pb2.JOB_STATE_CANCELLED
    stopped = await stack.stub.CancelScoringJob(pb.CancelScoringJobRequest(name=running.name))
    assert stopped.scoring_job.state == common_pb2.JOB_STATE_CANCELLED
    final = await finished(stack.stub, running)
    assert final.state == common_pb2.JOB_STATE_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stack.stub.CancelScoringJob(pb.CancelScoringJobRequest(name=running.name))
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    bad = [
        (create(stack.stub, "nope"), grpc.StatusCode.NOT_FOUND, "STRATEGY_NOT_FOUND"),
        (create(stack.stub, "epistemic", model="models/nope"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (create(stack.stub, "epistemic", model="nope"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"),
        (
            stack.stub.GetScoringJob(pb.GetScoringJobRequest(name="scoringJobs/unknown")),
            grpc.StatusCode.NOT_FOUND,
            "RECORD_NOT_FOUND",
        ),
        (
            stack.stub.ListScoringJobs(pb.ListScoringJobsRequest(page_token="x")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_INPUT",
        ),
    ]
    for call, code, reason in bad:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        assert failed.value.code() == code and error_reason(failed.value) == reason, failed.value.details()


async def _restart_mid_scoring(tmp_path: Path, resume: bool) -> tuple[Stack, res.ScoringJob, dict[str, float]]:
    stack = await start_stack(tmp_path, resume_scoring=resume)
    for n in range(5):
        image, noisy, _ = clean_and_noisy(seed=20 + n)
        await upload_image(stack.ds_stub, nifti(noisy if n % 2 else image), f"r{n}.nii.gz", f"r{n}")
    await stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/first", client_id="keeper"))
    job = await create(stack.stub, "epistemic", params={"passes": 12})
    async for message in stack.stub.WatchScoringJob(pb.WatchScoringJobRequest(name=job.name), timeout=240):
        if message.scoring_job.progress.scored >= 2:
            break
    # Stop the service while the job runs (as a crash or a rollout would).
    settings = stack.service.settings
    await stack.server.stop(0)
    await stack.channels[1].close()
    stored = await scores(stack, "epistemic_entropy")
    assert len(stored) >= 2
    server, service = await start_service(settings.model_copy(update={"port": 0}))
    stack.server, stack.service = server, service
    stack.channels[1] = grpc.aio.insecure_channel(server.address)
    stack.stub = pb_grpc.ActiveLearningServiceStub(stack.channels[1])
    return stack, job, stored


async def test_restart_mid_scoring_resumes_and_keeps_scores_and_leases(tmp_path: Path) -> None:
    stack, job, stored = await _restart_mid_scoring(tmp_path, resume=True)
    try:
        final = await finished(stack.stub, job)
        assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.log_tail
        assert "queued again: the service restarted" in final.log_tail
        assert final.progress.total == 5 and final.progress.skipped >= len(stored)
        assert final.progress.scored + final.progress.skipped == 5
        after = await scores(stack, "epistemic_entropy")
        assert len(after) == 5
        for image_id, value in stored.items():
            assert after[image_id] == pytest.approx(value)  # kept, not recomputed
        leases = await stack.stub.ListLeases(pb.ListLeasesRequest())
        assert [lease.client_id for lease in leases.leases] == ["keeper"]
    finally:
        await stop_stack(stack)


async def test_restart_mid_scoring_without_resume_reports_the_job_failed(tmp_path: Path) -> None:
    stack, job, stored = await _restart_mid_scoring(tmp_path, resume=False)
    try:

        async def ended() -> Any:
            got = (await stack.stub.GetScoringJob(pb.GetScoringJobRequest(name=job.name))).scoring_job
            return got if got.state != common_pb2.JOB_STATE_RUNNING else None

        got = await eventually(ended, "the scoring job to end", timeout=10, interval=0.1)
        assert got.state == common_pb2.JOB_STATE_FAILED and "restarted" in got.error.message
        assert len(await scores(stack, "epistemic_entropy")) >= len(stored)
    finally:
        await stop_stack(stack)
