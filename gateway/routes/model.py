"""MONAI Label's /model router: the weights inference serves, kept as model versions in the datastore.

GET returns the serving version (the pinned one, else the latest published), PUT publishes
an uploaded file as a new version (inference switches to it on its next request), DELETE
removes the serving version so inference falls back to the previous one, as MONAI Label
falls back when its model file is renamed away.
"""

from __future__ import annotations

from typing import Annotated, Any

import grpc
from fastapi import APIRouter, File, UploadFile
from fastapi.responses import StreamingResponse
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.inference.v1 import inference_service_pb2 as inf_pb

from gateway.clients import found_or_none, open_download, upload_stream
from gateway.errors import GatewayError, from_rpc_error
from gateway.routes.common import Ctx, CtxDep, check_id, file_response

router = APIRouter(prefix="/model", tags=["Model"])


def _serving(model: str) -> str:
    return f"models/{check_id(model, 'model name')}/versions/serving"


def _not_found(model: str) -> GatewayError:
    # MONAI Label's words for a model that has no weights file yet (it runs untrained here).
    return GatewayError(404, f"Model File NOT Found for {model}")


async def _serving_version(ctx: Ctx, model: str) -> Any:
    response = await found_or_none(
        ctx.clients.datastore.GetModelVersion(
            ds_pb.GetModelVersionRequest(name=_serving(model)), metadata=ctx.metadata, timeout=ctx.timeout
        )
    )
    if response is None:
        raise _not_found(model)
    return response.model_version


def _version_info(version: Any) -> dict[str, Any]:
    return {"checksum": f"SHA256:{version.sha256}", "modified_time": version.create_time.seconds}


@router.get("/{model}", summary="Download the model's serving weights")
async def download_model(model: str, ctx: Ctx = CtxDep) -> StreamingResponse:
    name = _serving(model)
    try:
        download = await open_download(
            lambda: ctx.clients.datastore.DownloadModelVersion(
                ds_pb.DownloadModelVersionRequest(name=name), metadata=ctx.metadata
            )
        )
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            raise _not_found(model) from None
        raise
    suffix = download.first.info.file_name.rpartition(".")[2] or "pt"
    return file_response(download, f"{model}.{suffix}")


@router.get("/info/{model}", summary="Checksum and time of the model's serving weights")
async def model_info(model: str, ctx: Ctx = CtxDep) -> dict[str, Any]:
    version = await _serving_version(ctx, model)
    return {**_version_info(version), "version": version.version}


@router.put("/{model}", summary="Publish new weights for a model")
async def upload_model(model: str, file: Annotated[UploadFile, File()], ctx: Ctx = CtxDep) -> dict[str, Any]:
    """The file becomes a new version; inference serves it from its next request on."""
    check_id(model, "model name")
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


@router.delete("/{model}", summary="Remove the model's serving weights")
async def delete_model(model: str, ctx: Ctx = CtxDep) -> dict[str, Any]:
    version = await _serving_version(ctx, model)
    try:
        await ctx.clients.datastore.DeleteModelVersion(
            ds_pb.DeleteModelVersionRequest(name=version.name), metadata=ctx.metadata, timeout=ctx.timeout
        )
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from None
    return {}
