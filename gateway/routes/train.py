"""MONAI Label's /train routes (`endpoints/train.py`) over the training service.

A training job is answered as MONAI Label's task: `{id, status, request, start_ts,
details?, end_ts?}` with SUBMITTED / RUNNING / DONE / ERROR / STOPPED. A second start while
one is queued or running is 429 unless `enqueue=true`; stop-when-idle is `200 null`;
`GET /train/` is 404 before any task. Stricter than MONAI Label: an unknown model is 404
at once (MONAI Label answers 200 and the task fails later). No labels yet: the task is
accepted and ends in ERROR, as in MONAI Label, with the reason in its details.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from fastapi import APIRouter, Body
from google.protobuf import json_format
from labelgrid.common.v1 import common_pb2
from labelgrid.training.v1 import resources_pb2 as res
from labelgrid.training.v1 import training_service_pb2 as pb

from gateway.errors import GatewayError, naming_service
from gateway.routes.common import (
    Ctx,
    CtxDep,
    all_pages,
    task_answer,
    task_status,
    task_time,
    to_struct,
    with_task_outcome,
)
from services.common.protos import struct_to_dict
from services.common.resource_names import resource_type

router = APIRouter(prefix="/train", tags=["Train"], route_class=naming_service("training", "training_address"))
log = logging.getLogger("labelgrid.gateway")

# Keys of MONAI Label's train request the service does not take as params.
_DROPPED = {"model", "client_id", "gpus", "multi_gpu", "device", "devices", "enqueue", "run_sync"}


_TRAINER = resource_type("labelgrid.training/Trainer")


def task_json(job: res.TrainingJob) -> dict[str, Any]:
    """A TrainingJob as MONAI Label's task object."""
    request: dict[str, Any] = {"model": _TRAINER.parse(job.trainer)[0]}
    params = job.params
    if params.HasField("extra"):
        request.update(struct_to_dict(params.extra))
    typed = json_format.MessageToDict(params, preserving_proto_field_name=True)
    for key in (
        "max_epochs",
        "val_split",
        "learning_rate",
        "train_batch_size",
        "val_batch_size",
        "amp",
        "pretrained",
        "early_stop_patience",
    ):
        if key in typed:
            request[key] = typed[key]
    if job.devices:
        request["device"] = list(job.devices)
    task: dict[str, Any] = {
        "id": job.job_id,
        "status": task_status(job.state),
        "request": request,
        "start_ts": task_time(job.times.create_time),
    }
    return with_task_outcome(task, job)


def _params(body: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """MONAI Label's request body as (params, devices): the viewer's "device" choice becomes devices."""
    body = dict(body or {})
    device = body.get("device")
    devices: list[str] = []
    if isinstance(device, str) and device:
        devices = [device]
    elif isinstance(device, list) and device and all(isinstance(d, str) for d in device):
        devices = [device[0]]  # a config choice sent back unchanged: its default
    elif device not in (None, "", []):
        raise GatewayError(422, f"device must be a device name such as 'cpu' or 'cuda:0', got {device!r}")
    return {k: v for k, v in body.items() if k not in _DROPPED}, devices


async def _create(ctx: Ctx, model: str, body: dict[str, Any] | None, enqueue: bool) -> res.TrainingJob:
    params, devices = _params(body)
    job = res.TrainingJob(
        trainer=f"trainers/{model}",
        params=res.TrainingParams(extra=to_struct(params), devices=devices),
    )
    response = await ctx.clients.training.CreateTrainingJob(
        pb.CreateTrainingJobRequest(training_job=job, enqueue=enqueue), timeout=ctx.timeout, metadata=ctx.metadata
    )
    return response.training_job


async def _wait_stats(ctx: Ctx, job: res.TrainingJob) -> dict[str, Any]:
    """run_sync: waits for the job's end and returns its train stats (MONAI Label's answer)."""
    last = job
    async for message in ctx.clients.training.WatchTrainingJob(
        pb.WatchTrainingJobRequest(name=job.name), metadata=ctx.metadata
    ):
        last = message.training_job
    if last.state == common_pb2.JOB_STATE_FAILED:
        raise GatewayError(500, f"training failed: {last.error.message}")
    return struct_to_dict(last.train_stats)


async def _jobs(ctx: Ctx, state: int = common_pb2.JOB_STATE_UNSPECIFIED) -> list[res.TrainingJob]:
    return [
        job
        async for page in all_pages(
            lambda token: ctx.clients.training.ListTrainingJobs(
                pb.ListTrainingJobsRequest(page_size=1000, page_token=token, state=state),
                timeout=ctx.timeout,
                metadata=ctx.metadata,
            )
        )
        for job in page.training_jobs
    ]


@router.get("/", summary="Get Status of Training Task")
async def api_status(all: bool = False, check_if_running: bool = False, ctx: Ctx = CtxDep) -> Any:
    state = common_pb2.JOB_STATE_RUNNING if check_if_running else common_pb2.JOB_STATE_UNSPECIFIED
    return task_answer(await _jobs(ctx, state), check_if_running, all, "Train", task_json)


@router.post("/", summary="Run All Training Tasks", include_in_schema=False, deprecated=True)
async def api_run(params: dict[str, Any] | None = Body(None), run_sync: bool = False, ctx: Ctx = CtxDep) -> Any:
    listing = await ctx.clients.training.ListTrainers(
        pb.ListTrainersRequest(), timeout=ctx.timeout, metadata=ctx.metadata
    )
    names = [trainer.trainer_id for trainer in listing.trainers]
    body = dict(params or {})
    common = {k: v for k, v in body.items() if not (k in names and isinstance(v, dict))}
    result: dict[str, Any] = {}
    for name in names:
        own = body[name] if isinstance(body.get(name), dict) else {}
        try:
            job = await _create(ctx, name, {**own, **common}, enqueue=True)
            result[name] = {"result": await _wait_stats(ctx, job) if run_sync else task_json(job), "detail": None}
        except grpc.aio.AioRpcError as err:
            result[name] = {"result": None, "detail": err.details()}
    return result


@router.post("/{model}", summary="Run Training Task for specific model")
async def api_run_model(
    model: str,
    params: dict[str, Any] | None = Body(None),
    run_sync: bool = False,
    enqueue: bool = False,
    ctx: Ctx = CtxDep,
) -> Any:
    job = await _create(ctx, model, params, enqueue)
    if run_sync:
        return await _wait_stats(ctx, job)
    return task_json(job)


@router.delete("/", summary="Stop Training Task")
async def api_stop(ctx: Ctx = CtxDep) -> Any:
    running = await _jobs(ctx, common_pb2.JOB_STATE_RUNNING)
    if not running:
        return None
    try:
        response = await ctx.clients.training.CancelTrainingJob(
            pb.CancelTrainingJobRequest(name=running[0].name), timeout=ctx.timeout + 60, metadata=ctx.metadata
        )
    except grpc.aio.AioRpcError as err:
        if err.code() is grpc.StatusCode.FAILED_PRECONDITION:
            return None  # it ended on its own meanwhile
        raise
    return task_json(response.training_job)
