"""Small client-side helpers for the datastore's chunk streams, used by the tests."""

from __future__ import annotations

import gzip
import hashlib
import io
from collections.abc import AsyncIterator
from typing import Any

import grpc
import nibabel as nib
import numpy as np
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as pb

CHUNK = 1024 * 1024


def nifti_bytes(
    shape: tuple[int, ...] = (16, 16, 16), *, seed: int = 0, dtype: Any = np.float32, gz: bool = True
) -> bytes:
    rng = np.random.default_rng(seed)
    data = (rng.random(shape) * 100).astype(dtype)
    image = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if gz else raw


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value or {})
    return out


async def _messages(request_type: Any, header: Any, data: bytes, digest: str | None, chunk: int) -> AsyncIterator[Any]:
    yield request_type(header=header)
    for start in range(0, len(data), chunk):
        yield request_type(chunk=data[start : start + chunk])
    if digest is not None:
        yield request_type(finish=common_pb2.UploadFinish(sha256=digest))


async def upload_image(
    stub: Any,
    data: bytes,
    file_name: str = "img.nii.gz",
    image_id: str = "",
    info: dict[str, Any] | None = None,
    *,
    digest: str | None = "auto",
    chunk: int = CHUNK,
) -> Any:
    header = pb.UploadImageHeader(image_id=image_id, file_name=file_name, info=struct(info), size_bytes=len(data))
    digest = sha256(data) if digest == "auto" else digest
    response = await stub.UploadImage(_messages(pb.UploadImageRequest, header, data, digest, chunk))
    return response.image


async def upload_label(
    stub: Any,
    image_id: str,
    data: bytes,
    tag: str = "final",
    file_name: str = "label.nii.gz",
    info: dict[str, Any] | None = None,
    *,
    digest: str | None = "auto",
) -> Any:
    header = pb.UploadLabelHeader(image=f"images/{image_id}", tag=tag, file_name=file_name, info=struct(info))
    digest = sha256(data) if digest == "auto" else digest
    response = await stub.UploadLabel(_messages(pb.UploadLabelRequest, header, data, digest, CHUNK))
    return response.label


async def upload_model(stub: Any, model: str, data: bytes, version: str = "", metrics: dict | None = None) -> Any:
    header = pb.UploadModelVersionHeader(
        model=f"models/{model}", version=version, file_name="model.pt", metrics=struct(metrics)
    )
    response = await stub.UploadModelVersion(_messages(pb.UploadModelVersionRequest, header, data, sha256(data), CHUNK))
    return response.model_version


async def download(call: Any) -> tuple[Any, bytes]:
    """Reads an info-then-chunks stream; returns (info, bytes)."""
    info = None
    body = io.BytesIO()
    async for message in call:
        if message.WhichOneof("payload") == "info":
            assert info is None, "info sent twice"
            info = message.info
        else:
            assert info is not None, "chunk before info"
            assert len(message.chunk) <= CHUNK
            body.write(message.chunk)
    return info, body.getvalue()


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The google.rpc.ErrorInfo reason of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status on {error.code()}: {error.details()}"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "labelgrid"
            return info.reason
    raise AssertionError("no ErrorInfo detail")
