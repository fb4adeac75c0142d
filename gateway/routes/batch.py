"""MONAI Label's /batch/infer routes (`endpoints/batch_infer.py`) over the inference service's
batch inference jobs.

`POST /batch/infer/{model}?images=all|labeled|unlabeled` (or a list of image ids as the
body's `images`, as MONAI Label's request takes it) starts a job that runs the model on
each image and saves the result as a label (`label_tag`, default "original"). The body's
`max_batch_size` caps the number of images; `device` / `multi_gpu` / `gpus` pick devices
(default: all of the service's). The job runs in the inference service, so a client that
hangs up, even with `run_sync`, does not stop it; `DELETE /batch/infer` does. Answers are
MONAI Label's task objects (SUBMITTED / RUNNING / DONE / ERROR / STOPPED, `details` with
the last log lines). `run_sync=true` waits for the end and answers, as MONAI Label does,
the per-image dict `{image_id: {"label", "tag", "params"}}` (`{}` for an image whose
inference failed; a stopped job answers the images done before it stopped).
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any

from fastapi import APIRouter, Body, Request
from labelgrid.common.v1 import common_pb2
from labelgrid.inference.v1 import inference_service_pb2 as pb
from labelgrid.inference.v1 import resources_pb2 as res

from gateway.errors import GatewayError, naming_service
from gateway.routes.common import (
    Ctx,
    CtxDep,
    all_pages,
    check_id,
    task_answer,
    task_status,
    task_time,
    to_struct,
    with_task_outcome,
)
from services.common.protos import struct_to_dict
from services.common.resource_names import resource_type

router = APIRouter(prefix="/batch", tags=["Infer"], route_class=naming_service("inference", "inference_address"))

_SYNC_POLL_SECONDS = 0.5
# MONAI Label's batch request keys that are not params of each inference.
_DROPPED = {
    "device",
    "multi_gpu",
    "gpus",
    "logging",
    "save_label",
    "label_tag",
    "max_workers",
    "max_batch_size",
    "images",
}
_FINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}


class BatchImages(str, enum.Enum):
    all = "all"
    labeled = "labeled"
    unlabeled = "unlabeled"


_FILTERS = {
    BatchImages.all: res.BATCH_IMAGE_FILTER_UNSPECIFIED,
    BatchImages.labeled: res.BATCH_IMAGE_FILTER_LABELED,
    BatchImages.unlabeled: res.BATCH_IMAGE_FILTER_UNLABELED,
}
_FILTER_NAMES = {value: key.value for key, value in _FILTERS.items()}


_MODEL = resource_type("labelgrid.inference/Model")
_IMAGE = resource_type("labelgrid.datastore/Image")


def task_json(job: res.BatchInferenceJob) -> dict[str, Any]:
    """A BatchInferenceJob as MONAI Label's task object, with progress."""
    request: dict[str, Any] = {"model": _MODEL.parse(job.model)[0]}
    request["images"] = (
        [_IMAGE.parse(name)[0] for name in job.images] if job.images else _FILTER_NAMES[job.image_filter]
    )
    request.update(struct_to_dict(job.params.params))
    request["label_tag"] = job.params.result.label_tag
    request["max_batch_size"] = job.max_images
    if job.devices:
        request["device"] = list(job.devices)
    task: dict[str, Any] = {
        "id": job.job_id,
        "status": task_status(job.state),
        "request": request,
        "start_ts": task_time(job.times.create_time),
        "progress": {"total": job.total_images, "done": job.processed_images, "failed": job.failed_images},
    }
    return with_task_outcome(task, job)


def sync_answer(job: res.BatchInferenceJob) -> dict[str, Any]:
    """MONAI Label's run_sync answer: each image's saved label, its tag and the inference's params."""
    answer: dict[str, Any] = {}
    for item in job.results:
        image = _IMAGE.parse(item.image)[0]
        answer[image] = (
            {} if item.failed else {"label": item.label, "tag": item.label_tag, "params": struct_to_dict(item.params)}
        )
    return answer


def _devices(body: dict[str, Any]) -> list[str]:
    """MONAI Label's device / multi_gpu / gpus as device names; [] = every device of the service."""
    device = body.get("device")
    if isinstance(device, list):  # a config choice sent back unchanged: its default
        device = device[0] if device else None
    if device is not None and not isinstance(device, str):
        raise GatewayError(422, f"device must be a device name such as 'cpu' or 'cuda:0', got {device!r}")
    gpus = body.get("gpus", "all")
    if body.get("multi_gpu", True) and (device in (None, "", "cuda")):
        if gpus in (None, "", "all"):
            return []
        if not isinstance(gpus, str) or not all(part.strip().isdigit() for part in gpus.split(",")):
            raise GatewayError(422, f"gpus must be 'all' or GPU indices such as '0,1', got {gpus!r}")
        return [f"cuda:{part.strip()}" for part in gpus.split(",")]
    return [device] if device else []


def _int(body: dict[str, Any], key: str) -> int:
    value = body.get(key, 0) or 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100_000:
        raise GatewayError(422, f"{key} must be an integer between 0 and 100000, got {value!r}")
    return value


def _job(model: str, images: BatchImages, body: dict[str, Any]) -> res.BatchInferenceJob:
    ids = body.get("images")
    if (ids is not None and ids not in [item.value for item in BatchImages]) and (
        not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids)
    ):
        raise GatewayError(422, "images in the body must be a non-empty list of image ids")
    label_tag = body.get("label_tag") or "original"
    if not isinstance(label_tag, str):
        raise GatewayError(422, "label_tag must be a string")
    check_id(label_tag, "label tag")
    image_filter = _FILTERS[BatchImages(ids) if isinstance(ids, str) else images]
    params = {key: value for key, value in body.items() if key not in _DROPPED}
    return res.BatchInferenceJob(
        model=f"models/{check_id(model, 'model name')}",
        image_filter=image_filter,
        images=[f"images/{check_id(i)}" for i in ids] if isinstance(ids, list) else [],
        max_images=_int(body, "max_batch_size"),
        params=res.InferParams(
            params=to_struct(params), result=res.ResultOptions(save_label=True, label_tag=label_tag)
        ),
        devices=_devices(body),
    )


async def _jobs(ctx: Ctx, state: int = common_pb2.JOB_STATE_UNSPECIFIED) -> list[res.BatchInferenceJob]:
    return [
        job
        async for page in all_pages(
            lambda token: ctx.clients.inference.ListBatchInferenceJobs(
                pb.ListBatchInferenceJobsRequest(page_size=1000, page_token=token, state=state),
                timeout=ctx.timeout,
                metadata=ctx.metadata,
            )
        )
        for job in page.batch_inference_jobs
    ]


@router.get("/infer", summary="Get Status of Batch Inference Task")
async def api_status(all: bool = False, check_if_running: bool = False, ctx: Ctx = CtxDep) -> Any:
    state = common_pb2.JOB_STATE_RUNNING if check_if_running else common_pb2.JOB_STATE_UNSPECIFIED
    return task_answer(await _jobs(ctx, state), check_if_running, all, "Batch_infer", task_json)


@router.post("/infer/{model}", summary="Run Batch Inference Task")
async def api_run(
    model: str,
    request: Request,
    images: BatchImages = BatchImages.all,
    params: dict[str, Any] | None = Body(None),
    run_sync: bool = False,
    ctx: Ctx = CtxDep,
) -> Any:
    job = _job(model, images, dict(params or {}))
    job.keep_results = run_sync
    created = await ctx.clients.inference.CreateBatchInferenceJob(
        pb.CreateBatchInferenceJobRequest(batch_inference_job=job), timeout=ctx.timeout, metadata=ctx.metadata
    )
    job = created.batch_inference_job
    # run_sync waits here; a client that hangs up ends only this wait, never the job.
    while run_sync and job.state not in _FINAL:
        await asyncio.sleep(_SYNC_POLL_SECONDS)
        if await request.is_disconnected():
            break
        answer = await ctx.clients.inference.GetBatchInferenceJob(
            pb.GetBatchInferenceJobRequest(name=job.name), timeout=ctx.timeout, metadata=ctx.metadata
        )
        job = answer.batch_inference_job
    if not run_sync or job.state not in _FINAL:  # the client hung up: nobody reads the answer
        return task_json(job)
    if job.state == common_pb2.JOB_STATE_FAILED:
        raise GatewayError(500, f"batch inference failed: {job.error.message}")
    return sync_answer(job)


@router.delete("/infer", summary="Stop Batch Inference Task")
async def api_stop(ctx: Ctx = CtxDep) -> Any:
    active = [
        job for job in await _jobs(ctx) if job.state in (common_pb2.JOB_STATE_RUNNING, common_pb2.JOB_STATE_QUEUED)
    ]
    if not active:
        return None
    stopped = None
    for job in sorted(active, key=lambda j: j.state != common_pb2.JOB_STATE_RUNNING):  # the running one first
        answer = await ctx.clients.inference.CancelBatchInferenceJob(
            pb.CancelBatchInferenceJobRequest(name=job.name), timeout=ctx.timeout, metadata=ctx.metadata
        )
        stopped = stopped or answer.batch_inference_job
    return task_json(stopped) if stopped is not None else None
