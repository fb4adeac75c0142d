"""MONAI Label's /model router: model weights and MONAI Bundles, kept as model versions in the datastore.

Weights: GET /model/info/{m} describes the serving version (the pinned one, else the latest
published); 404 while inference serves the initial weights. PUT publishes an uploaded weights
file as a new version (inference switches to it on its next request). DELETE makes inference
serve the initial weights again, as MONAI Label does when its model file is removed: it
publishes a reset version (`initial-…`), so every older version stays for a rollback (pin it).

Bundles: PUT with a `.zip` MONAI Bundle adds or replaces the bundle model `{m}` (admin only: a
bundle is code). The zip is checked in a child process (`python -m apps.bundle check`: every
part built by monai.bundle and the network run once) before anything is stored; a bad bundle
is a 422 naming what is wrong, and nothing is stored. Every inference, training and active
learning replica then loads it from the datastore. GET /model/{m} of a bundle model downloads
the bundle zip.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, File, Request, UploadFile
from fastapi.responses import StreamingResponse
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.inference.v1 import inference_service_pb2 as inf_pb

from gateway.clients import found_or_none, upload_stream
from gateway.errors import GatewayError, from_rpc_error
from gateway.routes.common import Ctx, CtxDep, check_id, ranged_file_response, to_struct
from services.common.auth import ADMIN
from services.common.bundles import RESET_FILE_NAME, archive_model, reset_marker
from services.common.models.types import RESET_VERSION_PREFIX

router = APIRouter(prefix="/model", tags=["Model"])

MAX_BUNDLE_BYTES = 4 * 1024**3
"""Largest bundle zip accepted (Model Zoo bundles are tens to hundreds of MB)."""
BUNDLE_CHECK_SECONDS = 600.0
_ZIP_MAGIC = b"PK\x03\x04"


def _serving(model: str) -> str:
    return f"models/{check_id(model, 'model name')}/versions/serving"


def _not_found(model: str) -> GatewayError:
    # MONAI Label's words for a model that has no weights file yet (it runs untrained here).
    return GatewayError(404, f"Model File NOT Found for {model}")


async def _serving_version(ctx: Ctx, model: str) -> Any:
    """The published version inference serves; 404 while it serves the initial weights."""
    response = await found_or_none(
        ctx.clients.datastore.GetModelVersion(
            ds_pb.GetModelVersionRequest(name=_serving(model)), metadata=ctx.metadata, timeout=ctx.timeout
        )
    )
    if response is None or response.model_version.version.startswith(RESET_VERSION_PREFIX):
        raise _not_found(model)
    return response.model_version


async def _bundle_version(ctx: Ctx, model: str) -> Any | None:
    """The stored zip of bundle model `model`, or None for an app model."""
    response = await found_or_none(
        ctx.clients.datastore.GetModelVersion(
            ds_pb.GetModelVersionRequest(
                name=f"models/{archive_model(check_id(model, 'model name'))}/versions/serving"
            ),
            metadata=ctx.metadata,
            timeout=ctx.timeout,
        )
    )
    return None if response is None else response.model_version


def _version_info(version: Any) -> dict[str, Any]:
    return {"checksum": f"SHA256:{version.sha256}", "modified_time": version.create_time.seconds}


def _require_admin(ctx: Ctx, what: str) -> None:
    if not ctx.identity.has_role(ADMIN):
        raise GatewayError(403, f"{what} needs the admin role: a MONAI Bundle is code")


@router.get("/{model}", summary="Download the model's serving weights, or a bundle model's bundle zip")
async def download_model(model: str, request: Request, ctx: Ctx = CtxDep) -> StreamingResponse:
    bundle = await _bundle_version(ctx, model)
    name = bundle.name if bundle is not None else _serving(model)

    def file_name(info: Any) -> str:
        if bundle is None and info.file_name == RESET_FILE_NAME:
            raise _not_found(model)
        suffix = "zip" if bundle is not None else info.file_name.rpartition(".")[2] or "pt"
        return f"{model}.{suffix}"

    try:
        return await ranged_file_response(
            request,
            lambda offset, limit: ctx.clients.datastore.DownloadModelVersion(
                ds_pb.DownloadModelVersionRequest(name=name, read_offset=offset, read_limit=limit),
                metadata=ctx.metadata,
            ),
            file_name,
        )
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            raise _not_found(model) from None
        raise


@router.get("/info/{model}", summary="Checksum and time of the model's serving weights")
async def model_info(model: str, ctx: Ctx = CtxDep) -> dict[str, Any]:
    version = await _serving_version(ctx, model)
    return {**_version_info(version), "version": version.version}


class _Bytes:
    """A small in-memory upload source."""

    def __init__(self, data: bytes):
        self.data = data

    async def read(self, size: int = -1) -> bytes:
        out, self.data = (self.data, b"") if size < 0 else (self.data[:size], self.data[size:])
        return out


async def _reset_weights(ctx: Ctx, model: str, reason: str) -> Any:
    """Publishes a reset version (services.common.bundles.ResetMarker) as the caller."""
    marker = reset_marker(model, reason)
    header = ds_pb.UploadModelVersionHeader(
        model=f"models/{model}",
        version=marker.version,
        file_name=RESET_FILE_NAME,
        size_bytes=len(marker.data),
        info=to_struct(marker.info),
    )
    try:
        response = await ctx.clients.datastore.UploadModelVersion(
            upload_stream(ds_pb.UploadModelVersionRequest, header, _Bytes(marker.data)), metadata=ctx.metadata
        )
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from None
    return response.model_version


async def _spool(file: UploadFile, dest: Path) -> str:
    """Writes the upload to `dest` (bounded), returning its sha256."""
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        while data := await file.read(1024 * 1024):
            size += len(data)
            if size > MAX_BUNDLE_BYTES:
                raise GatewayError(413, f"a bundle zip may be at most {MAX_BUNDLE_BYTES} bytes")
            digest.update(data)
            await asyncio.to_thread(out.write, data)
    return digest.hexdigest()


async def _check_bundle(path: Path) -> dict[str, Any]:
    """Builds the bundle in a child process (its configs run code): its description, or a 422."""
    # The bundle's code must not read the gateway's secrets (signing key, service tokens): none of LABELGRID_* is passed.
    env = {key: value for key, value in os.environ.items() if not key.startswith("LABELGRID_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "apps.bundle", "check", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=str(path.parent),
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), BUNDLE_CHECK_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise GatewayError(422, f"checking the bundle took longer than {BUNDLE_CHECK_SECONDS:.0f} s") from None
    lines = [line for line in stdout.decode(errors="replace").splitlines() if line.startswith("{")]
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        answer = {}
    if process.returncode == 0 and "error" not in answer and answer:
        return answer
    detail = answer.get("error") or stderr.decode(errors="replace").strip().splitlines()[-1:] or ["unknown error"]
    raise GatewayError(422, f"invalid MONAI Bundle: {detail if isinstance(detail, str) else detail[0]}")


async def _put_bundle(model: str, file: UploadFile, ctx: Ctx) -> dict[str, Any]:
    _require_admin(ctx, "adding a MONAI Bundle")
    existing = await found_or_none(
        ctx.clients.inference.GetModel(
            inf_pb.GetModelRequest(name=f"models/{model}"), metadata=ctx.metadata, timeout=ctx.timeout
        )
    )
    previous = await _bundle_version(ctx, model)
    if existing is not None and previous is None:
        raise GatewayError(409, f"model {model!r} is one of the app's models; a bundle needs a name of its own")
    scratch = Path(tempfile.mkdtemp(prefix="bundle-put-"))
    try:
        path = scratch / f"{model}.zip"
        sha = await _spool(file, path)
        with open(path, "rb") as head:
            if head.read(4) != _ZIP_MAGIC:
                raise GatewayError(422, "a MONAI Bundle is uploaded as a .zip file")
        description = await _check_bundle(path)
        if previous is not None and previous.sha256 == sha:
            return {**_version_info(previous), "version": previous.version, "bundle": description, "changed": False}
        info = {
            key: description[key]
            for key in ("version", "type", "labels", "description", "torchscript", "trainable")
            if key in description
        }
        header = ds_pb.UploadModelVersionHeader(
            model=f"models/{archive_model(model)}", file_name="bundle.zip", size_bytes=path.stat().st_size
        )
        header.info.update({"bundle": info})
        with open(path, "rb") as source:

            class _File:
                async def read(self, size: int = -1) -> bytes:
                    return await asyncio.to_thread(source.read, size)

            try:
                response = await ctx.clients.datastore.UploadModelVersion(
                    upload_stream(ds_pb.UploadModelVersionRequest, header, _File()), metadata=ctx.metadata
                )
            except grpc.aio.AioRpcError as err:
                raise from_rpc_error(err, invalid_status=422) from None
        if previous is not None:
            # The old bundle's trained weights may not fit the new network: serve the new bundle's own.
            serving = await found_or_none(
                ctx.clients.datastore.GetModelVersion(
                    ds_pb.GetModelVersionRequest(name=_serving(model)), metadata=ctx.metadata, timeout=ctx.timeout
                )
            )
            if serving is not None and not serving.model_version.version.startswith(RESET_VERSION_PREFIX):
                await _reset_weights(ctx, model, "bundle replaced")
        version = response.model_version
        return {**_version_info(version), "version": version.version, "bundle": description, "changed": True}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@router.put("/{model}", summary="Publish new weights for a model, or add / replace a MONAI Bundle (.zip, admin)")
async def upload_model(model: str, file: Annotated[UploadFile, File()], ctx: Ctx = CtxDep) -> dict[str, Any]:
    """Weights become a new version (inference serves them from its next request on); a bundle
    zip adds or replaces the bundle model `model` on every service."""
    check_id(model, "model name")
    if (file.filename or "").lower().endswith(".zip"):
        return await _put_bundle(model, file, ctx)
    try:
        await ctx.clients.inference.GetModel(
            inf_pb.GetModelRequest(name=f"models/{model}"), metadata=ctx.metadata, timeout=ctx.timeout
        )
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from None
    header = ds_pb.UploadModelVersionHeader(
        model=f"models/{model}", file_name="model.pt", size_bytes=int(file.size or 0)
    )
    try:
        response = await ctx.clients.datastore.UploadModelVersion(
            upload_stream(ds_pb.UploadModelVersionRequest, header, file), metadata=ctx.metadata
        )
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err, invalid_status=422) from None
    return _version_info(response.model_version)


@router.delete("/{model}", summary="Serve the model's initial weights again (trained versions kept for rollback)")
async def delete_model(model: str, ctx: Ctx = CtxDep) -> dict[str, Any]:
    await _serving_version(ctx, model)  # 404 when already on the initial weights
    state = await ctx.clients.datastore.GetModel(
        ds_pb.GetModelRequest(name=f"models/{model}"), metadata=ctx.metadata, timeout=ctx.timeout
    )
    try:
        if state.model.pinned_version:  # a pin would keep serving it: the reset is the new serving version
            await ctx.clients.datastore.PinModelVersion(
                ds_pb.PinModelVersionRequest(model=f"models/{model}", version=""),
                metadata=ctx.metadata,
                timeout=ctx.timeout,
            )
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from None
    await _reset_weights(ctx, model, "DELETE /model")
    return {}
