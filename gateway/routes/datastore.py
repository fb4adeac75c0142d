"""MONAI Label's /datastore router (`endpoints/datastore.py`) on the datastore gRPC service.

Ids are checked here (400 for path-like ones) before any call; uploads stream from the
request body as it arrives into UploadImage / UploadLabel (gateway.multipart: no temp file
in the gateway); downloads stream back. Sessions are the datastore's own resource (gateway.routes.session),
never images: listings and counts have nothing to leave out.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

import grpc
from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import resources_pb2 as ds_res

from gateway.changes import ChangeWatch, Token, change_watch
from gateway.clients import found_or_none, open_download
from gateway.envoy import EDGE_ETAG_HEADER, EDGE_S3_HEADER
from gateway.errors import from_rpc_error
from gateway.multipart import upload_form
from gateway.ranges import s3_answers_alike
from gateway.routes.common import (
    Ctx,
    CtxDep,
    check_user_image_id,
    etag_of,
    file_response,
    image_name,
    label_name,
    parse_json_field,
    ranged_file_response,
    to_struct,
)
from services.common.protos import struct_to_dict

router = APIRouter(prefix="/datastore", tags=["Datastore"])

DEFAULT_USER = "admin"
"""MONAI Label records this user in info when auth is off."""
PAGE_SIZE = 1000
log = logging.getLogger("labelgrid.gateway")


class ResultType(enum.StrEnum):
    train = "train"
    stats = "stats"
    all = "all"


# -- listing -------------------------------------------------------------------------------


STATS_KEY = "datastore stats"
"""gateway.changes key of the kept GET /datastore/ answer."""


async def datastore_stats(ctx: Ctx, watch: ChangeWatch) -> tuple[dict[str, Any], Token | None]:
    """MONAI Label's status(): {total, completed, label_tags} (sessions are not images);
    one query in the datastore. Also the token it was read under (see gateway.changes)."""
    watch.start(ctx.clients.datastore, ctx.service_metadata)
    token = watch.token()  # before the call: a write announced meanwhile makes it stale
    status = await ctx.clients.datastore.GetStatus(ds_pb.GetStatusRequest(), timeout=ctx.timeout, metadata=ctx.metadata)
    stats = {
        "total": int(status.total),
        "completed": int(status.completed),
        "label_tags": {tag: int(n) for tag, n in sorted(status.label_tags.items())},
    }
    return stats, token


async def _pages(ctx: Ctx, **filters: Any) -> AsyncIterator[list[ds_res.Image]]:
    token = ""
    while True:
        response = await ctx.clients.datastore.ListImages(
            ds_pb.ListImagesRequest(page_size=PAGE_SIZE, page_token=token, **filters),
            timeout=ctx.timeout,
            metadata=ctx.metadata,
        )
        yield list(response.images)
        token = response.next_page_token
        if not token:
            return


async def _datastore_all(ctx: Ctx) -> Response:
    """datastore_v2.json as the datastore keeps it (compact UTF-8 JSON, as FastAPI writes
    MONAI Label's answer; after a change only the changed images' entries are re-rendered);
    the gateway only passes the bytes on."""
    call = ctx.clients.datastore.ExportDatastoreJson(
        ds_pb.ExportDatastoreJsonRequest(),
        timeout=ctx.timeout,
        metadata=ctx.metadata,
    )
    body = b"".join([message.chunk async for message in call])
    return Response(body, media_type="application/json")


async def _datalist(ctx: Ctx, request: Request) -> list[dict[str, str]]:
    """MONAI Label's datalist with URLs of this gateway instead of server paths."""
    base = str(request.base_url)
    out = []
    async for page in _pages(ctx, filter=ds_pb.IMAGE_FILTER_LABELED, label_tag="final"):
        for image in page:
            image_id = quote(image.image_id, safe="")
            out.append(
                {
                    "image": f"{base}datastore/image?image={image_id}",
                    "label": f"{base}datastore/label?label={image_id}&tag=final",
                }
            )
    return out


@router.get("/", summary="Get All Images/Labels from datastore")
async def datastore(request: Request, output: ResultType | None = None, ctx: Ctx = CtxDep) -> Any:
    if output is ResultType.all:
        return await _datastore_all(ctx)
    if output is ResultType.train:
        return await _datalist(ctx, request)
    watch = change_watch(request.app)
    stats, token = await datastore_stats(ctx, watch)
    response = JSONResponse(stats)
    watch.put(STATS_KEY, token, bytes(response.body))
    return response


# -- images --------------------------------------------------------------------------------


def _id_from_file_name(file_name: str) -> str:
    """MONAI Label's default id: the file name without its whole suffix chain."""
    path = PurePosixPath(file_name)
    suffixes = "".join(path.suffixes)
    return path.name[: len(path.name) - len(suffixes)] if suffixes else path.name


def _upload_form(file_field: str) -> dict[str, Any]:
    """The form these routes read themselves (gateway.multipart streams it; FastAPI does not
    parse it), for the OpenAPI document: `params` (JSON) and the file part."""
    properties = {"params": {"type": "string", "default": "{}"}, file_field: {"type": "string", "format": "binary"}}
    schema = {"type": "object", "required": [file_field], "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


async def _add_image(ctx: Ctx, image: str | None, request: Request) -> dict[str, str]:
    if image:
        check_user_image_id(image)  # before any byte of the body is read

    def header(fields: dict[str, str], file_name: str) -> ds_pb.UploadImageHeader:
        info = parse_json_field(fields.get("params", "{}"), "params")
        image_id = check_user_image_id(image if image else _id_from_file_name(file_name))
        if ctx.settings.auth_enabled:  # the authenticated user, not what the client says
            info["user"] = ctx.identity.username
        info.setdefault("user", DEFAULT_USER)
        return ds_pb.UploadImageHeader(image_id=image_id, file_name=file_name, info=to_struct(info))

    try:
        response = await upload_form(
            request,
            "file",
            "image",
            header,
            lambda messages: ctx.clients.datastore.UploadImage(messages, metadata=ctx.metadata),
            ds_pb.UploadImageRequest,
        )
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err, invalid_status=422) from None
    return {"image": response.image.image_id}


@router.put("/image", summary="Upload new Image", openapi_extra=_upload_form("file"))
async def add_image(request: Request, image: str | None = Query(None), ctx: Ctx = CtxDep) -> dict[str, str]:
    return await _add_image(ctx, image, request)


@router.put("/", include_in_schema=False)
async def add_image_alias(request: Request, image: str | None = Query(None), ctx: Ctx = CtxDep) -> dict[str, str]:
    """The deprecated alias the official client's upload_image uses."""
    return await _add_image(ctx, image, request)


async def _remove_image(ctx: Ctx, image_id: str) -> dict[str, Any]:
    await ctx.clients.datastore.DeleteImage(
        ds_pb.DeleteImageRequest(name=image_name(image_id)),
        timeout=ctx.timeout,
        metadata=ctx.metadata,
    )
    return {}


@router.delete("/image", summary="Remove Image and corresponding labels")
async def remove_image(id: str = Query(...), ctx: Ctx = CtxDep) -> dict[str, Any]:
    return await _remove_image(ctx, id)


@router.delete("/", include_in_schema=False)
async def remove_image_alias(id: str = Query(...), ctx: Ctx = CtxDep) -> dict[str, Any]:
    return await _remove_image(ctx, id)


def _head(found: bool, detail: str) -> Response:
    """HEAD answers: the JSON headers of `{}` or `{"detail"}`, no body (as MONAI Label)."""
    return JSONResponse({} if found else {"detail": detail}, status_code=200 if found else 404)


async def _get_image(ctx: Ctx, image_id: str) -> ds_res.Image | None:
    response = await found_or_none(
        ctx.clients.datastore.GetImage(
            ds_pb.GetImageRequest(name=image_name(image_id)),
            timeout=ctx.timeout,
            metadata=ctx.metadata,
        )
    )
    return response.image if response is not None else None


def _normal_sha(value: str) -> str:
    text = value.strip()
    return (text[7:] if text[:7].lower() == "sha256:" else text).lower()


@router.head("/image", summary="Check If Image Exists")
async def image_exists(image: str = Query(...), check_sum: str | None = None, ctx: Ctx = CtxDep) -> Response:
    found = await _get_image(ctx, image)
    if found is None:
        return _head(False, "Image NOT Found")
    if check_sum and _normal_sha(check_sum) != found.sha256:
        return _head(False, "Image NOT Found (checksum failed)")
    return _head(True, "")


REDIRECT_QUERY = Query(
    None,
    description="With the gateway's download_redirect on: true answers 307 to S3, false streams "
    "through the gateway; unset: images without an Authorization header are redirected, labels stream. "
    "Behind an edge that fetches from S3 itself, a download not redirected to the client is still "
    "served from S3 (a plain 200) unless this is false.",
)


async def _redirect(ctx: Ctx, request: Request, name: str, asked: bool | None, by_default: bool) -> Response | None:
    """A 307 to a presigned S3 GET, or None to stream through the gateway.

    To the client (download_redirect on): signed for S3's public endpoint. Otherwise, when the
    edge asks (EDGE_S3_HEADER, set by Envoy on these routes only): signed for the address the
    edge reaches S3 at; the edge follows it and the client gets S3's bytes as a plain 200 (or
    206), with the stream's ETag (EDGE_ETAG_HEADER). Range requests S3 would answer otherwise
    than the stream (past the end, several ranges, a stale If-Range) are streamed.
    Runs after the auth check (CtxDep) and on a validated resource name; the datastore answers
    NOT_FOUND for an unknown image before any URL exists, and FAILED_PRECONDITION when it
    cannot hand downloads to S3 (local or dicomweb backend, no public endpoint): then it streams.
    """
    if asked is False:
        return None
    if ctx.settings.download_redirect and (asked or (by_default and "authorization" not in request.headers)):
        answer = await _download_url(ctx, name, for_client=True)
        return None if answer is None else _temporary_redirect(answer.url)
    edge_prefix = request.headers.get(EDGE_S3_HEADER)
    if not edge_prefix:
        return None
    answer = await _download_url(ctx, name, for_edge=True)
    if answer is None:
        return None
    if not answer.url.startswith(edge_prefix):
        # The edge would not follow it (its S3 address is not the datastore's): stream instead.
        _warn_edge_mismatch(edge_prefix)
        return None
    # S3 must answer the client's Range headers as the stream would; where it would not, stream.
    etag = etag_of(answer.info)
    if not s3_answers_alike(
        request.headers.get("range"), request.headers.get("if-range"), etag, answer.info.size_bytes
    ):
        return None
    return _temporary_redirect(answer.url, {EDGE_ETAG_HEADER: etag})


async def _download_url(
    ctx: Ctx, name: str, *, for_client: bool = False, for_edge: bool = False
) -> ds_pb.GetDownloadUrlResponse | None:
    """A presigned S3 GET, or None where the datastore hands no downloads to S3."""
    try:
        return await ctx.clients.datastore.GetDownloadUrl(
            ds_pb.GetDownloadUrlRequest(
                name=name,
                expire_seconds=ctx.settings.download_redirect_seconds,
                for_client=for_client,
                for_edge=for_edge,
            ),
            timeout=ctx.timeout,
            metadata=ctx.metadata,
        )
    except grpc.aio.AioRpcError as err:
        if err.code() is not grpc.StatusCode.FAILED_PRECONDITION:
            raise
        return None


def _temporary_redirect(url: str, headers: dict[str, str] | None = None) -> Response:
    return Response(status_code=307, headers={"location": url, "cache-control": "no-store", **(headers or {})})


@functools.cache
def _warn_edge_mismatch(edge_prefix: str) -> None:
    log.warning(
        "the edge fetches S3 downloads from %s, but the datastore signs for another address: "
        "downloads stream through the gateway (give Envoy the datastore's s3_endpoint)",
        edge_prefix,
    )


@router.get("/image", summary="Download Image", response_model=None)
async def download_image(
    request: Request, image: str = Query(...), redirect: bool | None = REDIRECT_QUERY, ctx: Ctx = CtxDep
) -> Response:
    name = image_name(image)
    redirected = await _redirect(ctx, request, name, redirect, by_default=True)
    if redirected is not None:
        return redirected
    return await ranged_file_response(
        request,
        lambda offset, limit: ctx.clients.datastore.DownloadImage(
            ds_pb.DownloadImageRequest(name=name, read_offset=offset, read_limit=limit), metadata=ctx.metadata
        ),
    )


@router.get("/image/info", summary="Get Image Info")
async def image_info(image: str = Query(...), ctx: Ctx = CtxDep) -> dict[str, Any]:
    """The image info; `{}` for an unknown id, as clients expect. No server path is returned."""
    found = await _get_image(ctx, image)
    return struct_to_dict(found.info) if found is not None else {}


@router.put("/image/info", summary="Update Image Info")
async def update_image_info(image: str = Query(...), info: str = Form(...), ctx: Ctx = CtxDep) -> None:
    values = parse_json_field(info, "info")
    values["user"] = ctx.identity.username  # "admin" (DEFAULT_USER) with auth off
    await ctx.clients.datastore.UpdateImageInfo(
        ds_pb.UpdateImageInfoRequest(name=image_name(image), info=to_struct(values)),
        timeout=ctx.timeout,
        metadata=ctx.metadata,
    )


# -- labels --------------------------------------------------------------------------------


@router.put("/label", summary="Save Finalized Label", openapi_extra=_upload_form("label"))
async def save_label(
    request: Request,
    image: str = Query(...),
    tag: str = Query("final"),
    ctx: Ctx = CtxDep,
) -> dict[str, str]:
    tag = tag or "final"
    name = label_name(image, tag)  # checks both before reading anything

    def header(fields: dict[str, str], file_name: str) -> ds_pb.UploadLabelHeader:
        info = parse_json_field(fields.get("params", "{}"), "params")
        if ctx.settings.auth_enabled:  # who saved it: the authenticated user (audit)
            info["user"] = ctx.identity.username
        return ds_pb.UploadLabelHeader(
            image=name.rsplit("/labels/", 1)[0], tag=tag, file_name=file_name, info=to_struct(info)
        )

    try:
        response = await upload_form(
            request,
            "label",
            "label",
            header,
            lambda messages: ctx.clients.datastore.UploadLabel(messages, metadata=ctx.metadata),
            ds_pb.UploadLabelRequest,
        )
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err, invalid_status=422) from None
    return {"image": response.label.image_id, "label": response.label.image_id}


@router.delete("/label", summary="Remove Label")
async def remove_label(id: str = Query(...), tag: str = Query(...), ctx: Ctx = CtxDep) -> dict[str, Any]:
    """`{}` also for an unknown label, as MONAI Label answers (clients rely on it)."""
    try:
        await ctx.clients.datastore.DeleteLabel(
            ds_pb.DeleteLabelRequest(name=label_name(id, tag)),
            timeout=ctx.timeout,
            metadata=ctx.metadata,
        )
    except grpc.aio.AioRpcError as err:
        if err.code() is not grpc.StatusCode.NOT_FOUND:
            raise
    return {}


async def _get_label(ctx: Ctx, image_id: str, tag: str) -> ds_res.Label | None:
    response = await found_or_none(
        ctx.clients.datastore.GetLabel(
            ds_pb.GetLabelRequest(name=label_name(image_id, tag)),
            timeout=ctx.timeout,
            metadata=ctx.metadata,
        )
    )
    return response.label if response is not None else None


@router.head("/label", summary="Check If Label Exists")
async def label_exists(image: str = Query(...), tag: str = Query(...), ctx: Ctx = CtxDep) -> Response:
    found = await _get_label(ctx, image, tag)
    return _head(found is not None, "Label NOT Found")


@router.get("/label", summary="Download Label", response_model=None)
async def download_label(
    request: Request,
    label: str = Query(...),
    tag: str = Query(...),
    redirect: bool | None = REDIRECT_QUERY,
    ctx: Ctx = CtxDep,
) -> Response:
    name = label_name(label, tag)
    redirected = await _redirect(ctx, request, name, redirect, by_default=False)
    if redirected is not None:
        return redirected
    return await ranged_file_response(
        request,
        lambda offset, limit: ctx.clients.datastore.DownloadLabel(
            ds_pb.DownloadLabelRequest(name=name, read_offset=offset, read_limit=limit), metadata=ctx.metadata
        ),
    )


@router.get("/label/info", summary="Get Label Info")
async def label_info(label: str = Query(...), tag: str = Query(...), ctx: Ctx = CtxDep) -> dict[str, Any]:
    found = await _get_label(ctx, label, tag)
    return struct_to_dict(found.info) if found is not None else {}


async def _update_label_info(ctx: Ctx, label: str, tag: str, info: str, field: str) -> None:
    values = parse_json_field(info, field)
    values["user"] = ctx.identity.username  # "admin" (DEFAULT_USER) with auth off
    await ctx.clients.datastore.UpdateLabelInfo(
        ds_pb.UpdateLabelInfoRequest(name=label_name(label, tag), info=to_struct(values)),
        timeout=ctx.timeout,
        metadata=ctx.metadata,
    )


@router.put("/label/info", summary="Update Label Info")
async def update_label_info(
    label: str = Query(...),
    tag: str = Query(...),
    info: str = Form(...),
    ctx: Ctx = CtxDep,
) -> None:
    await _update_label_info(ctx, label, tag, info, "info")


@router.put("/updatelabelinfo", include_in_schema=False)
async def update_label_info_reviewer(
    label: str = Query(...),
    tag: str = Query(...),
    params: str = Form(...),
    ctx: Ctx = CtxDep,
) -> None:
    """What MONAILabelReviewer calls."""
    await _update_label_info(ctx, label, tag, params, "params")


# -- dataset -------------------------------------------------------------------------------


@router.get("/dataset", summary="Download full dataset as ZIP archive")
async def download_dataset(limit_cases: int | None = Query(None, ge=0), ctx: Ctx = CtxDep) -> StreamingResponse:
    download = await open_download(
        lambda: ctx.clients.datastore.ExportDataset(
            ds_pb.ExportDatasetRequest(limit_cases=limit_cases or 0),
            metadata=ctx.metadata,
        )
    )
    return file_response(download, "dataset.zip")
