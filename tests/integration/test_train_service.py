"""The training service as users run it: its own process, a real datastore process, real jobs.

The datastore holds the sample studies (spheres with labels, the MNI152 T1 with its brain
mask). Jobs run in child processes on the CPU; nothing is mocked. Tests compare outcomes
(Dice before and after training, states, error codes), never wall-clock times.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import nibabel as nib
import numpy as np
import psutil
import pytest
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as ds
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from labelgrid.inference.v1 import inference_service_pb2 as inf
from labelgrid.inference.v1 import inference_service_pb2_grpc as inf_grpc
from labelgrid.inference.v1 import resources_pb2 as inf_res
from labelgrid.training.v1 import resources_pb2 as res
from labelgrid.training.v1 import training_service_pb2 as pb
from labelgrid.training.v1 import training_service_pb2_grpc as pb_grpc

from services.common.grpc_errors import error_details
from services.datastore.sample_studies import BRAIN_ID, mni152_t1, write_sample_studies
from tests.fixtures.polling import eventually
from tests.fixtures.processes import ServiceProcess

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_RUNNING, common_pb2.JOB_STATE_SUCCEEDED,
    common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED,
)  # fmt: skip
FINAL = {SUCCEEDED, FAILED, CANCELLED}


def start_training(datastore: str, work_dir: Path, *extra: str) -> ServiceProcess:
    return ServiceProcess(
        "services.train", "--datastore", datastore, "--work-dir", str(work_dir), "--device", "cpu",
        "--torch-threads", "1", "--stop-grace-seconds", "2", *extra, start_timeout=120,
    )  # fmt: skip


@dataclass
class Stack:
    datastore: ServiceProcess
    training: ServiceProcess
    work_dir: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("train")
    write_sample_studies(root / "studies", count=3, labeled=2, size=48, brain=True)
    datastore = ServiceProcess(
        "services.datastore",
        "--metrics-port",
        "-1",
        "--root",
        str(root / "studies"),
        "--state-dir",
        str(root / "state"),
    )
    training = start_training(datastore.address, root / "train")
    yield Stack(datastore, training, root / "train")
    training.stop()
    datastore.stop()


@pytest.fixture
async def stub(stack: Stack) -> AsyncIterator[pb_grpc.TrainingServiceStub]:
    async with grpc.aio.insecure_channel(stack.training.address) as channel:
        yield pb_grpc.TrainingServiceStub(channel)


def job_of(trainer: str, **params: Any) -> res.TrainingJob:
    extra = params.pop("extra", None)
    message = res.TrainingJob(trainer=f"trainers/{trainer}", params=res.TrainingParams(**params))
    if extra:
        message.params.extra.update(extra)
    return message


async def create(
    stub: pb_grpc.TrainingServiceStub, trainer: str, enqueue: bool = False, **params: Any
) -> res.TrainingJob:
    request = pb.CreateTrainingJobRequest(training_job=job_of(trainer, **params), enqueue=enqueue)
    return (await stub.CreateTrainingJob(request, timeout=30)).training_job


async def wait_for(stub: pb_grpc.TrainingServiceStub, name: str, until: Any, timeout: float = 240) -> res.TrainingJob:
    """Watches the job until `until(job)` holds (or it ends); returns that job."""
    job = None

    async def watch() -> res.TrainingJob:
        nonlocal job
        async for message in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(name=name)):
            job = message.training_job
            if until(job) or job.state in FINAL:
                return job
        assert job is not None
        return job

    return await asyncio.wait_for(watch(), timeout)


async def expect_error(call: Any, code: grpc.StatusCode, reason: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = error_details(caught.value)
    assert (details.code, details.reason) == (code, reason), details
    return details.message


def worker_pids(service: ServiceProcess) -> list[int]:
    return [child.pid for child in psutil.Process(service.proc.pid).children(recursive=True)]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pids: list[int], timeout: float = 30) -> None:
    await eventually(lambda: all(gone(pid) for pid in pids), f"processes {pids} to exit", timeout=timeout, interval=0.2)


# -- contract basics -------------------------------------------------------------------------


async def test_trainers_are_the_apps(stub: pb_grpc.TrainingServiceStub) -> None:
    trainers = (await stub.ListTrainers(pb.ListTrainersRequest())).trainers
    assert [t.trainer_id for t in trainers] == ["segmentation", "segmentation_brain", "deepgrow", "deepedit"]
    brain = trainers[1]
    assert brain.name == "trainers/segmentation_brain" and brain.model == "models/segmentation_brain"
    config = {entry.key: entry.value for entry in brain.config}
    assert config["max_epochs"].int_value > 0 and list(config["device"].choice_value.options) == ["cpu"]
    assert dict(brain.labels) == {"brain": 1}
    stats = await stub.GetTrainStats(pb.GetTrainStatsRequest(trainer="trainers/deepedit"))
    assert not stats.train_stats.fields and stats.training_job == ""


async def test_bad_requests_are_clear_errors(stub: pb_grpc.TrainingServiceStub) -> None:
    def start(trainer: str, **params: Any) -> Any:
        return stub.CreateTrainingJob(pb.CreateTrainingJobRequest(training_job=job_of(trainer, **params)))

    message = await expect_error(
        start("segmentation", max_epochs=-3), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"
    )
    assert "max_epochs" in message
    message = await expect_error(start("nope"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert "nope" in message and "segmentation" in message
    message = await expect_error(
        start("segmentation", devices=["cuda:7"]), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"
    )
    assert "cuda:7" in message
    await expect_error(start("segmentation", device_count=5), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    await expect_error(start("segmentation", val_split=1.5), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    await expect_error(start("segmentation", learning_rate=0.0), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    await expect_error(
        start("segmentation", extra={"max_epochs": "ten"}), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"
    )
    await expect_error(
        start("segmentation", extra={"dataset": "Nope"}), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"
    )
    await expect_error(
        start("segmentation", initial_model_version="models/segmentation/versions/v999999"),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
    )
    await expect_error(
        stub.GetTrainingJob(pb.GetTrainingJobRequest(name="trainingJobs/nope")),
        grpc.StatusCode.NOT_FOUND,
        "RECORD_NOT_FOUND",
    )
    await expect_error(
        stub.GetTrainingJob(pb.GetTrainingJobRequest(name="jobs/x")), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"
    )
    await expect_error(
        stub.ListTrainingJobs(pb.ListTrainingJobsRequest(page_token="garbage")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    # Nothing was queued by any of these.
    assert not (await stub.ListTrainingJobs(pb.ListTrainingJobsRequest())).training_jobs


# -- queue, stop, kill -----------------------------------------------------------------------


async def test_queue_stop_kill_and_the_next_job_runs(stack: Stack, stub: pb_grpc.TrainingServiceStub) -> None:
    long_run = {"max_epochs": 200, "extra": {"dataset": "Dataset"}}
    first = await create(stub, "segmentation", **long_run)
    assert first.state in (QUEUED, RUNNING) and first.name == f"trainingJobs/{first.job_id}"
    first = await wait_for(stub, first.name, lambda j: j.progress.iteration >= 1)
    assert first.state == RUNNING and first.devices == ["cpu"] and first.progress.total_epochs == 200
    assert first.progress.loss > 0 and first.times.HasField("start_time")

    # A second start while one runs: MONAI Label's "already running", or queued with enqueue.
    message = await expect_error(
        stub.CreateTrainingJob(pb.CreateTrainingJobRequest(training_job=job_of("segmentation", max_epochs=1))),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_RUNNING",
    )
    assert "Already Running" in message
    queued = await create(stub, "segmentation", enqueue=True, max_epochs=1)
    assert queued.state == QUEUED and queued.queue_position == 1
    listed = (await stub.ListTrainingJobs(pb.ListTrainingJobsRequest(state=QUEUED))).training_jobs
    assert [j.job_id for j in listed] == [queued.job_id] and listed[0].queue_position == 1
    metrics = httpx.get(f"http://127.0.0.1:{stack.training.metrics_port}/metrics").text
    assert "labelgrid_training_queue_length 1.0" in metrics
    assert 'labelgrid_training_jobs{state="running"} 1.0' in metrics
    cancelled = (await stub.CancelTrainingJob(pb.CancelTrainingJobRequest(name=queued.name))).training_job
    assert cancelled.state == CANCELLED and cancelled.queue_position == 0

    # kill -9 of the job's process: the job fails, the service stays up.
    pids = worker_pids(stack.training)
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    failed = await wait_for(stub, first.name, lambda j: False, timeout=60)
    assert failed.state == FAILED and failed.error.reason == "APP_TRAIN_FAILED"
    assert "SIGKILL" in failed.error.message
    assert stack.training.proc.poll() is None

    # Stop mid-run: CANCELLED within seconds, its processes gone.
    second = await create(stub, "segmentation", **long_run)
    second = await wait_for(stub, second.name, lambda j: j.progress.iteration >= 1)
    pids = worker_pids(stack.training)
    stopped = (await stub.CancelTrainingJob(pb.CancelTrainingJobRequest(name=second.name), timeout=60)).training_job
    assert stopped.state == CANCELLED and stopped.times.HasField("end_time")
    await wait_gone(pids)
    await expect_error(
        stub.CancelTrainingJob(pb.CancelTrainingJobRequest(name=second.name)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "FAILED_PRECONDITION",
    )

    # The next job runs to the end, and reads every image from the local cache this time.
    third = await create(stub, "segmentation", max_epochs=1, val_split=0.0)
    done = await wait_for(stub, third.name, lambda j: False)
    assert done.state == SUCCEEDED, list(done.log_tail)
    assert any("0 file(s) fetched from the datastore" in line for line in done.log_tail), list(done.log_tail)
    assert done.model_version.startswith("models/segmentation/versions/")
    stats = (await stub.GetTrainStats(pb.GetTrainStatsRequest(trainer="trainers/segmentation"))).train_stats
    assert (
        stats["total_epochs"] == 1 and "total_time" in stats and stats["train"]["key_metric_name"] == "train_mean_dice"
    )
    metrics = httpx.get(f"http://127.0.0.1:{stack.training.metrics_port}/metrics").text
    assert 'labelgrid_training_jobs{state="failed"} 1.0' in metrics
    assert 'labelgrid_training_jobs{state="cancelled"} 2.0' in metrics
    assert "labelgrid_training_cache_hits_total" in metrics


# -- no labels; a restart of the service; DistributedDataParallel on two CPU processes ---------


async def test_no_labels_restart_and_ddp(tmp_path: Path) -> None:
    (tmp_path / "studies").mkdir()
    datastore = ServiceProcess(
        "services.datastore",
        "--metrics-port",
        "-1",
        "--root",
        str(tmp_path / "studies"),
        "--state-dir",
        str(tmp_path / "state"),
    )
    training = start_training(datastore.address, tmp_path / "train", "--cpu-slots", "2")
    try:
        async with grpc.aio.insecure_channel(training.address) as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            job = await create(stub, "segmentation", max_epochs=1)
            job = await wait_for(stub, job.name, lambda j: False, timeout=60)
            assert job.state == FAILED and job.error.reason == "APP_TRAIN_FAILED"
            assert "no labeled images" in job.error.message

        # Label two images, then train on two gloo processes.
        image, label, affine = mni152_t1()
        async with grpc.aio.insecure_channel(datastore.address) as ds_channel:
            ds_stub = ds_grpc.DatastoreServiceStub(ds_channel)
            rng = np.random.default_rng(0)
            for index in range(2):
                crop = (slice(20, 68), slice(30, 78), slice(20, 68))
                await upload(
                    ds_stub,
                    f"brain_{index}",
                    image[crop] + rng.normal(0, 0.01, (48, 48, 48)).astype(np.float32),
                    affine,
                    label[crop],
                )
        async with grpc.aio.insecure_channel(training.address) as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            ddp = await create(stub, "segmentation_brain", max_epochs=1, device_count=2, val_split=0.5)
            ddp = await wait_for(stub, ddp.name, lambda j: False)
            assert ddp.state == SUCCEEDED, "\n".join([ddp.error.message, *ddp.log_tail])
            assert list(ddp.devices) == ["cpu", "cpu"]
            assert ddp.model_version and ddp.progress.metric_name == "val_mean_dice"

            # kill -9 of the service while a job runs: after a restart the job is FAILED, its
            # processes are gone, and the records are intact.
            running = await create(stub, "segmentation_brain", max_epochs=200)
            running = await wait_for(stub, running.name, lambda j: j.progress.iteration >= 1)
            pids = worker_pids(training)
        training.proc.kill()
        training.proc.wait()
        await wait_gone(pids)
        training = start_training(datastore.address, tmp_path / "train", "--cpu-slots", "2")
        async with grpc.aio.insecure_channel(training.address) as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            lost = (await stub.GetTrainingJob(pb.GetTrainingJobRequest(name=running.name))).training_job
            assert lost.state == FAILED and "restarted" in lost.error.message
            jobs = (await stub.ListTrainingJobs(pb.ListTrainingJobsRequest())).training_jobs
            assert [j.job_id for j in jobs] == [running.job_id, ddp.job_id, job.job_id]  # newest first
            assert all(j.state in FINAL for j in jobs)
            assert (
                await stub.GetTrainStats(pb.GetTrainStatsRequest(trainer="trainers/segmentation_brain"))
            ).train_stats
    finally:
        training.stop()
        datastore.stop()


async def upload(
    stub: ds_grpc.DatastoreServiceStub, image_id: str, image: np.ndarray, affine: np.ndarray, label: np.ndarray
) -> None:
    import hashlib

    for kind, data in (("image", image), ("label", label)):
        payload = gzip.compress(nib.Nifti1Image(data, affine).to_bytes(), compresslevel=1)
        digest = hashlib.sha256(payload).hexdigest()
        if kind == "image":
            messages = [
                ds.UploadImageRequest(
                    header=ds.UploadImageHeader(
                        image_id=image_id, file_name=f"{image_id}.nii.gz", size_bytes=len(payload)
                    )
                ),
                ds.UploadImageRequest(chunk=payload),
                ds.UploadImageRequest(finish=common_pb2.UploadFinish(sha256=digest)),
            ]
            await stub.UploadImage(iter(messages))
        else:
            messages = [
                ds.UploadLabelRequest(
                    header=ds.UploadLabelHeader(
                        image=f"images/{image_id}", tag="final", file_name=f"{image_id}.nii.gz", size_bytes=len(payload)
                    )
                ),
                ds.UploadLabelRequest(chunk=payload),
                ds.UploadLabelRequest(finish=common_pb2.UploadFinish(sha256=digest)),
            ]
            await stub.UploadLabel(iter(messages))


# -- the brain: training improves Dice, inference serves the new version without a restart ----


async def infer_brain(stub: inf_grpc.InferenceServiceStub) -> tuple[np.ndarray, str]:
    header, body = None, io.BytesIO()
    request = inf.InferRequest(
        model="models/segmentation_brain", image=f"images/{BRAIN_ID}", params=inf_res.InferParams()
    )
    async for message in stub.Infer(request, timeout=300):
        if message.WhichOneof("payload") == "header":
            header = message.header
        else:
            body.write(message.chunk)
    assert header is not None
    label = nib.Nifti1Image.from_bytes(gzip.decompress(body.getvalue()))
    return np.asarray(label.dataobj), header.model_version


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    a, b = prediction > 0, truth > 0
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


async def test_brain_training_beats_the_untrained_model_and_is_served_hot(
    stack: Stack, stub: pb_grpc.TrainingServiceStub
) -> None:
    inference = ServiceProcess(
        "services.infer", "--metrics-port", "-1", "--datastore", stack.datastore.address, "--device", "cpu",
        "--work-dir", str(stack.work_dir.parent / "infer"), "--version-check-seconds", "0.2", "--no-warm-up",
        start_timeout=120,
    )  # fmt: skip
    try:
        _image, truth, _affine = mni152_t1()
        async with grpc.aio.insecure_channel(inference.address) as channel:
            inf_stub = inf_grpc.InferenceServiceStub(channel)
            before, version = await infer_brain(inf_stub)
            assert version == ""  # the untrained weights
            untrained = dice(before, truth)

            job = await create(stub, "segmentation_brain", max_epochs=3, val_split=0.2, learning_rate=0.01)
            # Requests keep coming while training publishes: each one succeeds, on one version or the next.
            seen: list[str] = []

            async def keep_inferring() -> None:
                while True:
                    _label, served = await infer_brain(inf_stub)
                    seen.append(served)

            client = asyncio.create_task(keep_inferring())
            try:
                done = await wait_for(stub, job.name, lambda j: False, timeout=400)
                # The loop goes on until a request started before the switch has been answered after it.
                await eventually(
                    lambda: any(seen) or client.done(), "an answer from after the switch", timeout=180, interval=0.2
                )
            finally:
                client.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await client
            assert done.state == SUCCEEDED, list(done.log_tail)
            assert done.model_version.startswith("models/segmentation_brain/versions/")
            assert done.progress.metric_name == "val_mean_dice" and done.progress.best_metric > 0
            assert done.train_stats["total_epochs"] == 3 and "eval" in done.train_stats
            # The loop crossed a switch: answers from the untrained weights, then from published versions.
            assert "" in seen and any(v.startswith("models/segmentation_brain/versions/") for v in seen), seen
            assert seen.index("") < max(i for i, v in enumerate(seen) if v), seen

            after, served = await infer_brain(inf_stub)
            assert served == done.model_version
            trained = dice(after, truth)
            assert trained > untrained + 0.2, (untrained, trained)
            assert trained > 0.7, (untrained, trained)
    finally:
        inference.stop()
