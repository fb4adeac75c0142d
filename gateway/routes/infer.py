"""MONAI Label's POST /infer/{model} (`endpoints/infer.py`) on InferenceService.Infer /
InferUpload, with MONAI Label's three answer shapes (multipart, file, JSON).

The image is a datastore id, a session, or an uploaded `file`, never a server path. The
result streams through; the multipart answer carries a Content-Length because the official
client parses the raw socket with `cgi` and cannot read a chunked body.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.inference.v1 import inference_service_pb2 as inf_pb
from labelgrid.inference.v1 import resources_pb2 as inf_res

from gateway.clients import Download, open_download, upload_stream
from gateway.errors import GatewayError, from_rpc_error
from gateway.routes import infer_seg
from gateway.routes.common import (
    Ctx,
    CtxDep,
    base_name,
    check_id,
    content_disposition,
    image_name,
    media_type,
    parse_json_field,
    to_struct,
    upload_size,
)
from services.common.protos import struct_to_dict

router = APIRouter(tags=["Infer"])


class OutputType(str, enum.Enum):
    image = "image"
    json = "json"
    all = "all"
    dicom_seg = "dicom_seg"


# -- params --------------------------------------------------------------------------------


def _bad(detail: str) -> GatewayError:
    return GatewayError(422, f"invalid infer params: {detail}")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise _bad(f"{what} must be an integer, not {value!r}")
    return int(value)


def _point(value: Any, what: str) -> inf_res.VoxelPoint:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise _bad(f"{what} must be a voxel index [i, j, k], not {value!r}")
    i, j, k = (_int(v, what) for v in value)
    return inf_res.VoxelPoint(i=i, j=j, k=k)


def _points(value: Any, what: str) -> list[inf_res.VoxelPoint]:
    if not isinstance(value, list):
        raise _bad(f"{what} must be a list of [i, j, k]")
    return [_point(p, what) for p in value]


def _prompt(values: dict[str, Any]) -> inf_res.Prompt:
    """The typed prompt from MONAI Label's params keys; the keys also stay in the free-form params."""
    prompt = inf_res.Prompt()
    label = values.get("label", values.get("selected_label_name"))
    if isinstance(label, str):
        prompt.label = label
    if "foreground" in values:
        prompt.foreground.extend(_points(values["foreground"], "foreground"))
    if "background" in values:
        prompt.background.extend(_points(values["background"], "background"))
    roi = values.get("roi")
    if roi:
        if not isinstance(roi, list) or len(roi) != 6:
            raise _bad("roi must be [i0, i1, j0, j1, k0, k1]")
        i0, i1, j0, j1, k0, k1 = (_int(v, "roi") for v in roi)
        prompt.roi.CopyFrom(inf_res.VoxelRoi(i0=i0, i1=i1, j0=j0, j1=j1, k0=k0, k1=k1))
    if values.get("slice") is not None:
        prompt.slice = _int(values["slice"], "slice")
    prompt.reset_state = bool(values.get("reset_state", False))
    points = values.get("points")
    if points:
        point_labels = values.get("point_labels") or []
        if not isinstance(point_labels, list) or len(point_labels) != len(points):
            raise _bad("point_labels must have one entry per point")
        for point, point_label in zip(_points(points, "points"), point_labels, strict=True):
            prompt.points.append(inf_res.PromptPoint(point=point, point_label=_int(point_label, "point_labels")))
    label_prompt = values.get("label_prompt")
    if label_prompt:
        if not isinstance(label_prompt, list):
            raise _bad("label_prompt must be a list of label indices")
        prompt.label_prompt.extend(_int(v, "label_prompt") for v in label_prompt)
    return prompt


def infer_params(values: dict[str, Any], output: OutputType | None) -> inf_res.InferParams:
    """MONAI Label's params JSON as InferParams: typed fields where they have a meaning, all keys
    also in `params` for the task."""
    for key in ("result_extension", "result_dtype", "label_tag", "device"):
        if values.get(key) is not None and not isinstance(values[key], str):
            raise _bad(f"{key} must be a string")
    device = values.get("device")
    result = inf_res.ResultOptions(
        result_extension=values.get("result_extension") or "",
        result_dtype=values.get("result_dtype") or "",
        result_compress=bool(values.get("result_compress", False)),
        save_label=bool(values.get("save_label", False)),
        label_tag=values.get("label_tag") or "",
        params_only=output is OutputType.json,
    )
    return inf_res.InferParams(
        prompt=_prompt(values),
        result=result,
        device=device or "",
        params=to_struct(values),
    )


# -- answers -------------------------------------------------------------------------------


def _result_params(header: inf_pb.InferResultHeader) -> dict[str, Any]:
    params = struct_to_dict(header.result_params)
    if "label_names" not in params and header.label_names:
        params["label_names"] = dict(sorted(header.label_names.items(), key=lambda item: item[1]))
    return params


def _multipart(download: Download, params: dict[str, Any], file_name: str) -> Response:
    """MONAI Label's default answer: parts `params` (JSON) and `image` (the file), with a length."""
    boundary = uuid.uuid4().hex
    head = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\nContent-Type: application/json\r\n\r\n'
        ).encode()
        + json.dumps(params).encode()
        + (
            f"\r\n--{boundary}\r\n"
            f'Content-Disposition: form-data; name="image"; filename="{file_name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
    )
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = download.first.header.label.size_bytes

    async def body() -> AsyncIterator[bytes]:
        yield head
        async for chunk in download.chunks():
            yield chunk
        yield tail

    return StreamingResponse(
        body(),
        media_type=f"multipart/form-data; boundary={boundary}",
        headers={"content-length": str(len(head) + size + len(tail))},
    )


def _answer(download: Download, output: OutputType | None) -> Response:
    header = download.first.header
    params = _result_params(header)
    has_file = header.HasField("label") and output is not OutputType.json
    if not has_file:
        download.call.cancel()
        return JSONResponse(params)
    # The file name travels to the viewer, which saves it under its tmpdir: keep the base name.
    file_name = base_name(header.label.file_name).replace('"', "") or "result.nii.gz"
    if output is OutputType.image:
        headers = {
            "content-disposition": content_disposition(file_name),
            "content-length": str(header.label.size_bytes),
        }
        return StreamingResponse(download.chunks(), media_type=media_type(file_name), headers=headers)
    return _multipart(download, params, file_name)


# -- route ---------------------------------------------------------------------------------


async def _upload_requests(
    header: inf_pb.InferUploadHeader, file: UploadFile | None, label: UploadFile | None
) -> AsyncIterator[inf_pb.InferUploadRequest]:
    yield inf_pb.InferUploadRequest(header=header)
    if file is not None:
        async for message in upload_stream(
            inf_pb.InferUploadRequest,
            None,
            file,
            chunk_field="image_chunk",
            finish_field="image_finish",
            first=False,
        ):
            yield message
    if label is not None:
        async for message in upload_stream(
            inf_pb.InferUploadRequest,
            None,
            label,
            chunk_field="label_chunk",
            finish_field="label_finish",
            first=False,
        ):
            yield message


# What the inference service reads as an input label (it checks again). Refused here, before
# the upload starts: a server that refuses a stream it has not read can reach the client as
# INTERNAL instead of its status (grpc/grpc#36066).
_LABEL_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".bin")
_IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


def _checked_upload(upload: UploadFile | None, what: str) -> UploadFile | None:
    if upload is None:
        return None
    name = base_name(upload.filename)
    if not name:
        raise GatewayError(
            422,
            f"the {what} upload needs a file name (its extension selects the format)",
        )
    if what == "label" and not name.lower().endswith(_LABEL_EXTENSIONS):
        raise GatewayError(
            422,
            f"label file name {name[:100]!r}: accepted formats are {', '.join(_LABEL_EXTENSIONS)}",
        )
    if what == "image" and not name.lower().endswith(_IMAGE_EXTENSIONS):
        raise GatewayError(
            422,
            f"image file name {name[:100]!r}: accepted formats are {', '.join(_IMAGE_EXTENSIONS)}",
        )
    if upload_size(upload) == 0:
        raise GatewayError(422, f"the {what} file is empty")
    return upload


@router.post("/infer/{model}", summary="Run Inference")
async def run_inference(
    model: str,
    http_request: Request,
    image: str = Query(""),
    session_id: str = Query(""),
    output: OutputType | None = None,
    params: str = Form("{}"),
    file: Annotated[UploadFile | None, File()] = None,
    label: Annotated[UploadFile | None, File()] = None,
    ctx: Ctx = CtxDep,
) -> Response:
    model_res = f"models/{check_id(model, 'model name')}"
    values = parse_json_field(params, "params")
    if output is OutputType.dicom_seg:
        infer_seg.check_available(ctx, file is not None, session_id)
    file = _checked_upload(file, "image")
    label = _checked_upload(label, "label")
    request_params = infer_params(values, output)

    # As MONAI Label: a session wins over a file, a file over an image id.
    image_res = ""
    if session_id:
        # As MONAI Label, an unknown or expired session is a 404 before anything runs; the
        # inference service then reads the session's volume from the datastore by this name.
        image_res, file = f"sessions/{session_id}", None
        try:
            await ctx.clients.datastore.GetSession(
                ds_pb.GetSessionRequest(name=image_res), timeout=ctx.timeout, metadata=ctx.service_metadata
            )
        except grpc.aio.AioRpcError as err:
            if err.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise from_rpc_error(err, service="datastore", address=ctx.settings.datastore_address) from None
            raise GatewayError(404, f"Session ({session_id}) Not Found") from None
    elif file is None:
        if not image:
            raise GatewayError(400, "Neither image nor file nor session_id is provided")
        image_res = image_name(image)
    seg_source = await infer_seg.source_series(ctx, image_res) if output is OutputType.dicom_seg else None

    if file is None and label is None:
        request = inf_pb.InferRequest(model=model_res, image=image_res, params=request_params)

        def start() -> Any:
            return ctx.clients.inference.Infer(
                request, timeout=ctx.settings.infer_timeout_seconds, metadata=ctx.metadata
            )

    else:
        header = inf_pb.InferUploadHeader(
            model=model_res,
            image=image_res,
            image_file_name=base_name(file.filename) if file else "",
            image_size_bytes=upload_size(file) if file else 0,
            label_file_name=base_name(label.filename) if label else "",
            label_size_bytes=upload_size(label) if label else 0,
            params=request_params,
        )

        def start() -> Any:
            return ctx.clients.inference.InferUpload(
                _upload_requests(header, file, label), timeout=ctx.settings.infer_timeout_seconds, metadata=ctx.metadata
            )

    try:
        download = await open_download(start)
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(
            err,
            invalid_status=422,
            service="inference",
            address=ctx.settings.inference_address,
        ) from None
    if seg_source is not None:
        return await infer_seg.answer(
            ctx, http_request.app.state.dicom_proxy, seg_source, download, _result_params(download.first.header), model
        )
    return _answer(download, output)
