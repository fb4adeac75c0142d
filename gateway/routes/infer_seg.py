"""`POST /infer/{model}?output=dicom_seg`: the inference result as a DICOM SEG that references
its source series, as MONAI Label answers it with a DICOMweb datastore (`application/dicom`).

Only a series of the DICOMweb datastore can be referenced: with another datastore (or an
uploaded file) the answer is a 501 / 422 that says so, before anything runs. The SEG is built
by services/common/dicom_seg.py (the same code that writes final labels back to the PACS); the
source series' headers come from the PACS by WADO-RS metadata, through the gateway's DICOMweb
client (the /proxy/dicom one: its URL, prefixes and credentials).
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from fastapi.responses import Response
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb

from gateway.clients import Download, found_or_none
from gateway.errors import GatewayError, from_rpc_error
from gateway.routes.common import Ctx, base_name, content_disposition
from services.common import dicom_seg
from services.common.errors import InvalidArgument
from services.common.models.volumes import VolumeFiles
from services.common.protos import struct_to_dict

NEEDS_DICOMWEB = (
    "output=dicom_seg needs a DICOMweb datastore (start labelgrid with --studies http://HOST:PORT/dicom-web): "
    "DICOM SEG format is not supported in a non-DICOM datastore"
)


@dataclass(frozen=True)
class SourceSeries:
    study_uid: str
    series_uid: str


def check_available(ctx: Ctx, has_file: bool, session_id: str) -> None:
    """Before anything runs: a DICOMweb source is configured and the input can be a series."""
    if not ctx.settings.dicomweb_url:
        raise GatewayError(501, NEEDS_DICOMWEB)
    if has_file and not session_id:
        raise GatewayError(
            422,
            "output=dicom_seg references a series of the DICOMweb datastore: give image=<SeriesInstanceUID>, not a file",
        )


async def source_series(ctx: Ctx, image_res: str) -> SourceSeries:
    """The datastore's record of the image: a DICOMweb series has its study and series UIDs."""
    try:
        response = await found_or_none(
            ctx.clients.datastore.GetImage(
                ds_pb.GetImageRequest(name=image_res), timeout=ctx.timeout, metadata=ctx.metadata
            )
        )
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err, service="datastore", address=ctx.settings.datastore_address) from None
    image_id = image_res.removeprefix("images/")
    if response is None:
        raise GatewayError(404, f"Image {image_id} NOT Found")
    info = struct_to_dict(response.image.info)
    study, series = info.get("StudyInstanceUID"), info.get("SeriesInstanceUID")
    if not isinstance(study, str) or not isinstance(series, str) or not study or not series:
        raise GatewayError(422, f"image {image_id!r} is not a series of a DICOMweb datastore: {NEEDS_DICOMWEB}")
    return SourceSeries(study, series)


def _names(params: dict[str, Any]) -> dict[int, str]:
    """The result's label_names (name -> index, or a list) as index -> name."""
    names = params.get("label_names")
    if isinstance(names, list):
        return {index: str(name) for index, name in enumerate(names, start=1)}
    out: dict[int, str] = {}
    if isinstance(names, dict):
        for name, value in names.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[int(value)] = str(name)
    return out


async def _metadata(proxy: Any, source: SourceSeries) -> list[dict[str, Any]]:
    url = proxy.target("wado", f"studies/{source.study_uid}/series/{source.series_uid}/metadata")
    try:
        answer = await proxy.client.get(url, headers={"accept": "application/dicom+json"})
    except httpx.HTTPError as err:
        raise GatewayError(503, f"the DICOMweb server is unavailable (WADO metadata: {type(err).__name__})") from None
    if answer.status_code == 404:
        raise GatewayError(404, f"series {source.series_uid} is not in the DICOMweb server")
    if answer.status_code != 200:
        raise GatewayError(502, f"the DICOMweb server answered {answer.status_code} to WADO metadata")
    try:
        items = answer.json()
    except ValueError:
        raise GatewayError(502, "the DICOMweb server's series metadata is not DICOM JSON") from None
    if not isinstance(items, list) or not items:
        raise GatewayError(502, "the DICOMweb server's series metadata is empty")
    return items


def _build(path: Path, file_name: str, items: list[dict[str, Any]], names: dict[int, str], model: str) -> bytes:
    volume = VolumeFiles().read(path, file_name)
    label = np.rint(volume.data).astype(np.uint16)
    if label.ndim == 4 and label.shape[-1] == 1:
        label = label[..., 0]
    seg = dicom_seg.label_to_seg(
        label,
        volume.affine,
        dicom_seg.datasets_from_metadata(items),
        names,
        algorithm=model,
        description=f"labelgrid {model}",
    )
    return dicom_seg.to_bytes(seg)


async def answer(
    ctx: Ctx, proxy: Any, source: SourceSeries, download: Download, params: dict[str, Any], model: str
) -> Response:
    """Reads the label the inference answered, builds the SEG on the series' headers, answers it."""
    header = download.first.header
    if not header.HasField("label"):
        download.call.cancel()
        raise GatewayError(422, f"model {model!r} answered no label volume: there is nothing to write as a DICOM SEG")
    file_name = base_name(header.label.file_name) or "result.nii.gz"
    with tempfile.TemporaryDirectory(prefix="labelgrid-seg-") as tmp:
        path = Path(tmp) / file_name  # the readers go by the extension
        with open(path, "wb") as out:
            async for chunk in download.chunks():
                out.write(chunk)
        items = await _metadata(proxy, source)
        try:
            content = await asyncio.to_thread(_build, path, file_name, items, _names(params), model)
        except InvalidArgument as err:
            raise GatewayError(
                422, f"the inference result cannot be a DICOM SEG of series {source.series_uid}: {err}"
            ) from None
    seg_name = f"{source.series_uid}.seg.dcm"
    return Response(
        content,
        media_type=dicom_seg.SEG_MEDIA_TYPE,
        headers={"content-disposition": content_disposition(seg_name)},
    )
