"""MONAI Label's /activelearning and /scoring routers (`endpoints/activelearning.py`,
`endpoints/scoring.py`) on the active learning gRPC service.

`POST /activelearning/{strategy}` leases the image it hands out to the asking client, so
several annotators never get the same one; the answer keeps MONAI Label's shape (the image
info as it was, `id`, `name`, `path`, `checksum`, the strategy's own keys) and `{}` when
nothing is left, with the reason in the `X-Labelgrid-No-Sample` header. `path` is this
gateway's download URL (no server path leaks; Slicer downloads from it). Scoring tasks
keep MONAI Label's task shape (`id`, `status` SUBMITTED/RUNNING/DONE/ERROR/STOPPED,
`request`, `start_ts`, `details`, `end_ts`).
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any
from urllib.parse import quote

import grpc
from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse
from labelgrid.activelearning.v1 import activelearning_service_pb2 as al_pb
from labelgrid.activelearning.v1 import resources_pb2 as al_res
from labelgrid.common.v1 import common_pb2

from gateway.auth import client_address, download_grants
from gateway.errors import GatewayError, naming_service
from gateway.routes.common import (
    Ctx,
    CtxDep,
    all_pages,
    check_id,
    task_status,
    task_time,
    to_struct,
)
from services.common.auth import issue_download_token
from services.common.protos import struct_to_dict
from services.common.resource_names import resource_type

router = APIRouter(route_class=naming_service("active learning", "activelearning_address"))
log = logging.getLogger("labelgrid.gateway")

DEFAULT_CLIENT = "admin"
"""MONAI Label's client when the request names none (its default user with auth off)."""
NO_SAMPLE_HEADER = "X-Labelgrid-No-Sample"
_NO_SAMPLE = {
    al_pb.NO_SAMPLE_REASON_EMPTY: "EMPTY",
    al_pb.NO_SAMPLE_REASON_ALL_LABELED: "ALL_LABELED",
    al_pb.NO_SAMPLE_REASON_ALL_LEASED: "ALL_LEASED",
}
_ACTIVE = (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_RUNNING)


# -- /activelearning/{strategy} ---------------------------------------------------------------


def _client_id(params: dict[str, Any]) -> str:
    value = params.pop("client_id", None)
    if value is None or value == "":
        return DEFAULT_CLIENT
    if not isinstance(value, str):
        raise GatewayError(422, "client_id must be a string")
    return value


def _ttl(params: dict[str, Any]) -> int:
    value = params.pop("lease_ttl_seconds", 0) or 0
    not_whole = isinstance(value, bool) or not isinstance(value, (int, float))
    if not_whole or (isinstance(value, float) and not math.isfinite(value)) or value != int(value):
        raise GatewayError(422, "lease_ttl_seconds must be a whole number of seconds")
    if not -(2**31) <= value < 2**31:  # the contract's int32; the service says what range it takes
        raise GatewayError(400, f"lease_ttl_seconds {value} is out of range")
    return int(value)


@router.post(
    "/activelearning/{strategy}", tags=["ActiveLearning"], summary="Run Active Learning strategy to get next sample"
)
async def sample(
    strategy: str, request: Request, params: Annotated[dict[str, Any] | None, Body()] = None, ctx: Ctx = CtxDep
) -> Any:
    check_id(strategy, "strategy")
    params = dict(params or {})
    client_id = _client_id(params)
    ttl = _ttl(params)
    response = await ctx.clients.activelearning.NextSample(
        al_pb.NextSampleRequest(
            strategy=f"strategies/{strategy}", client_id=client_id, params=to_struct(params), lease_ttl_seconds=ttl
        ),
        timeout=ctx.timeout,
        metadata=ctx.metadata,
    )
    if not response.HasField("image"):
        # MONAI Label's "nothing left" answer, which Slicer and OHIF check for; the header says why.
        reason = _NO_SAMPLE.get(response.no_sample_reason, "ALL_LEASED")
        return JSONResponse({}, headers={NO_SAMPLE_HEADER: reason})
    image, lease = response.image, response.lease
    base = str(request.base_url)
    path = f"{base}datastore/image?image={quote(image.image_id, safe='')}"
    if ctx.settings.auth_enabled and ctx.settings.auth_signing_key:
        # A download link that needs no header (MONAI Label issue 1493): signed, short-lived,
        # for this image and this user only (gateway.auth checks it).
        token = issue_download_token(
            image.image_id, ctx.identity.username, ctx.settings.auth_signing_key, ctx.settings.auth_download_ttl_seconds
        )
        path += f"&token={token}"
        if ctx.settings.auth_slicer_download_grants:
            # Stock Slicer ignores this link and GETs /datastore/image?image=ID bare: one such
            # download, from this address, for a short while (gateway.auth.DownloadGrants: a datastore
            # record, so every gateway replica honours it).
            await download_grants(request.app).grant(
                image.image_id, client_address(request.scope), ctx.identity.username,
                ctx.settings.auth_download_ttl_seconds, ctx.service_metadata,
            )  # fmt: skip
    return {
        **struct_to_dict(image.info),
        "id": image.image_id,
        "name": image.file_name,
        "path": path,
        "checksum": f"SHA256:{image.sha256}",
        **struct_to_dict(response.strategy_info),
        "lease": {
            "client_id": lease.client_id,
            "strategy": strategy,
            "expire_ts": lease.expire_time.seconds,
        },
    }


# -- /scoring/ ------------------------------------------------------------------------------------


_METHOD = resource_type("labelgrid.activelearning/ScoringMethod")
_MODEL = resource_type("labelgrid.inference/Model")
_MODEL_VERSION = resource_type("labelgrid.datastore/ModelVersion")


def task_json(job: al_res.ScoringJob) -> dict[str, Any]:
    """A scoring job in MONAI Label's task shape (plus labelgrid's progress and errors)."""
    method = _METHOD.parse(job.method)[0]
    model = _MODEL.parse(job.model)[0] if job.model else ""
    task: dict[str, Any] = {
        "id": job.job_id,
        "status": task_status(job.state),
        "request": {"method": method, "model": model, **struct_to_dict(job.params)},
        "start_ts": task_time(job.times.start_time if job.times.HasField("start_time") else job.times.create_time),
        "progress": {
            "total": job.progress.total,
            "scored": job.progress.scored,
            "skipped": job.progress.skipped,
            "failed": job.progress.failed,
        },
    }
    if job.force:
        task["request"]["force"] = True
    if job.model_version:
        task["model_version"] = _MODEL_VERSION.parse(job.model_version)[1]
    if job.log_tail or job.state != common_pb2.JOB_STATE_QUEUED:
        task["details"] = list(job.log_tail)
    if job.times.HasField("end_time"):
        task["end_ts"] = task_time(job.times.end_time)
    if job.state == common_pb2.JOB_STATE_SUCCEEDED:
        task["result"] = dict(task["progress"])
    if job.HasField("error"):
        task["error"] = {"reason": job.error.reason, "message": job.error.message}
    return task


async def _jobs(ctx: Ctx) -> list[al_res.ScoringJob]:
    """Every scoring job, newest first."""
    return [
        job
        async for page in all_pages(
            lambda token: ctx.clients.activelearning.ListScoringJobs(
                al_pb.ListScoringJobsRequest(page_size=1000, page_token=token),
                timeout=ctx.timeout,
                metadata=ctx.metadata,
            )
        )
        for job in page.scoring_jobs
    ]


@router.get("/scoring/", tags=["Scoring"], summary="Get Status of Scoring Task")
async def status(all: bool = False, check_if_running: bool = False, ctx: Ctx = CtxDep) -> Any:
    jobs = await _jobs(ctx)
    if all:
        return [task_json(job) for job in reversed(jobs)]
    if check_if_running:
        running = [job for job in jobs if job.state == common_pb2.JOB_STATE_RUNNING]
        if not running:
            raise GatewayError(404, "No Scoring Tasks are currently Running")
        return task_json(running[0])
    if not jobs:
        raise GatewayError(404, "No Scoring Tasks Found")
    return task_json(jobs[0])


async def _start(ctx: Ctx, method: str, params: dict[str, Any], enqueue: bool) -> al_res.ScoringJob:
    check_id(method, "scoring method")
    params = dict(params)
    model = params.pop("model", "") or ""
    force = params.pop("force", False)
    if not isinstance(model, str) or not isinstance(force, bool):
        raise GatewayError(422, "model must be a model name and force a boolean")
    if model:
        check_id(model, "model name")
    job = al_res.ScoringJob(
        method=f"scoringMethods/{method}",
        model=f"models/{model}" if model else "",
        params=to_struct(params),
        force=force,
    )
    response = await ctx.clients.activelearning.CreateScoringJob(
        al_pb.CreateScoringJobRequest(scoring_job=job, enqueue=enqueue), timeout=ctx.timeout, metadata=ctx.metadata
    )
    return response.scoring_job


async def _wait(ctx: Ctx, job: al_res.ScoringJob) -> al_res.ScoringJob:
    last = job
    async for message in ctx.clients.activelearning.WatchScoringJob(
        al_pb.WatchScoringJobRequest(name=job.name), metadata=ctx.metadata
    ):
        last = message.scoring_job
    return last


@router.post("/scoring/{method}", tags=["Scoring"], summary="Run Scoring Task")
async def run(
    method: str,
    params: Annotated[dict[str, Any] | None, Body()] = None,
    run_sync: bool = False,
    enqueue: bool = False,
    ctx: Ctx = CtxDep,
) -> Any:
    """A task, as MONAI Label answers; 429 while a run of the same method is active (unless
    `enqueue`); with `run_sync` the answer waits for the run to end."""
    params = dict(params or {})
    params.pop("client_id", None)
    job = await _start(ctx, method, params, enqueue)
    if run_sync:
        job = await _wait(ctx, job)
    return task_json(job)


@router.post("/scoring/", tags=["Scoring"], summary="Run All Scoring Methods", include_in_schema=False)
async def run_all(
    params: Annotated[dict[str, Any] | None, Body()] = None, run_sync: bool = False, ctx: Ctx = CtxDep
) -> Any:
    """MONAI Label's deprecated "run all": `{method: params}`, every method queued."""
    params = dict(params or {})
    params.pop("client_id", None)
    listing = await ctx.clients.activelearning.ListScoringMethods(
        al_pb.ListScoringMethodsRequest(), timeout=ctx.timeout, metadata=ctx.metadata
    )
    out: dict[str, Any] = {}
    for entry in listing.scoring_methods:
        own = params.get(entry.method_id)
        job = await _start(ctx, entry.method_id, own if isinstance(own, dict) else {}, enqueue=True)
        if run_sync:
            job = await _wait(ctx, job)
        out[entry.method_id] = {"result": task_json(job), "detail": None}
    return out


@router.delete("/scoring/", tags=["Scoring"], summary="Stop Scoring Task")
async def stop(ctx: Ctx = CtxDep) -> Any:
    """The stopped task, or null when nothing runs (as MONAI Label answers)."""
    running = [job for job in await _jobs(ctx) if job.state == common_pb2.JOB_STATE_RUNNING]
    if not running:
        return None
    try:
        response = await ctx.clients.activelearning.CancelScoringJob(
            al_pb.CancelScoringJobRequest(name=running[0].name), timeout=ctx.timeout, metadata=ctx.metadata
        )
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
            return None  # it ended meanwhile
        raise
    return task_json(response.scoring_job)
