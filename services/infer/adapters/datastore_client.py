"""The datastore, over gRPC: images and weights down to temp files, labels up, versions looked up.

Failures come back as domain errors with the datastore's own reason (IMAGE_NOT_FOUND,
MODEL_NOT_FOUND ...), so a client of the inference service sees the same reason it would
see from the datastore; an unreachable datastore is STORAGE_ERROR (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as ds
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc

from services.common.chunks import CHUNK_SIZE
from services.common.errors import ErrorKind, LabelgridError, StorageError
from services.common.grpc_errors import error_details

T = TypeVar("T")


def domain_error(rpc_error: grpc.aio.AioRpcError, what: str) -> LabelgridError:
    """The datastore's failure as a domain error of the same kind and reason."""
    details = error_details(rpc_error)
    if details.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN):
        return StorageError(f"the datastore failed while {what}: {details.message or details.code.name}")
    error = LabelgridError(details.message or f"the datastore failed while {what}", reason=details.reason, metadata=details.metadata)
    try:
        error.kind = ErrorKind[details.code.name]
    except KeyError:
        error.kind = ErrorKind.INTERNAL
    return error


class DatastoreClient:
    """`DatastorePort` over one grpc.aio channel (created lazily on the serving loop)."""

    def __init__(self, address: str, timeout_seconds: float = 120.0):
        self.address = address
        self.timeout = timeout_seconds
        self._channel: grpc.aio.Channel | None = None
        self._stub: ds_grpc.DatastoreServiceStub | None = None

    @property
    def stub(self) -> ds_grpc.DatastoreServiceStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.address,
                options=[
                    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
                    ("grpc.max_send_message_length", 8 * 1024 * 1024),
                    # Spread calls over every datastore replica a headless Service resolves to.
                    ("grpc.lb_policy_name", "round_robin"),
                ],
            )
            self._stub = ds_grpc.DatastoreServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            raise domain_error(error, what) from None

    async def _download(self, call: Any, dest_dir: Path, fallback_name: str, what: str) -> Path:
        """Writes an info-then-chunks stream to dest_dir/<file name>, verifying its sha256."""
        path: Path | None = None
        digest = hashlib.sha256()
        expected = ""
        file = None
        try:
            async for message in call:
                if message.WhichOneof("payload") == "info":
                    name = Path(message.info.file_name).name or fallback_name
                    path = Path(dest_dir) / name
                    expected = message.info.sha256
                    file = await asyncio.to_thread(open, path, "wb")
                else:
                    if file is None:
                        raise StorageError(f"the datastore sent data before the file info while {what}")
                    digest.update(message.chunk)
                    await asyncio.to_thread(file.write, message.chunk)
        except grpc.aio.AioRpcError as error:
            raise domain_error(error, what) from None
        finally:
            if file is not None:
                file.close()
        if path is None:
            raise StorageError(f"the datastore sent no file info while {what}")
        if expected and digest.hexdigest() != expected:
            raise StorageError(f"the datastore's bytes did not match their sha256 while {what}")
        return path

    async def download_image(self, image_id: str, dest_dir: Path) -> Path:
        call = self.stub.DownloadImage(ds.DownloadImageRequest(name=f"images/{image_id}"), timeout=self.timeout)
        return await self._download(call, dest_dir, f"{image_id}.nii.gz", f"reading image {image_id!r}")

    async def download_model_version(self, model: str, version: str, dest_dir: Path) -> Path:
        call = self.stub.DownloadModelVersion(
            ds.DownloadModelVersionRequest(name=f"models/{model}/versions/{version}"), timeout=self.timeout
        )
        return await self._download(call, dest_dir, "model.pt", f"reading version {version!r} of model {model!r}")

    async def upload_label(self, image_id: str, tag: str, path: Path, file_name: str, info: dict[str, Any]) -> str:
        info_struct = struct_pb2.Struct()
        info_struct.update(info)

        async def messages() -> AsyncIterator[ds.UploadLabelRequest]:
            header = ds.UploadLabelHeader(
                image=f"images/{image_id}", tag=tag, file_name=file_name, info=info_struct, size_bytes=path.stat().st_size
            )
            yield ds.UploadLabelRequest(header=header)
            digest = hashlib.sha256()
            file = await asyncio.to_thread(open, path, "rb")
            try:
                while chunk := await asyncio.to_thread(file.read, CHUNK_SIZE):
                    digest.update(chunk)
                    yield ds.UploadLabelRequest(chunk=chunk)
            finally:
                file.close()
            yield ds.UploadLabelRequest(finish=common_pb2.UploadFinish(sha256=digest.hexdigest()))

        response = await self._call(
            f"saving the label of image {image_id!r}", lambda: self.stub.UploadLabel(messages(), timeout=self.timeout)
        )
        return response.label.name or f"images/{image_id}/labels/{tag}"

    async def serving_version(self, model: str) -> str | None:
        try:
            response = await self.stub.GetModel(ds.GetModelRequest(name=f"models/{model}"), timeout=min(self.timeout, 10.0))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None  # nothing published yet: the app's initial weights
            raise domain_error(error, f"looking up the served version of model {model!r}") from None
        return response.model.serving_version or None

    async def list_versions(self, model: str) -> list[str]:
        versions: list[str] = []
        token = ""
        while True:
            try:
                response = await self.stub.ListModelVersions(
                    ds.ListModelVersionsRequest(parent=f"models/{model}", page_size=1000, page_token=token),
                    timeout=min(self.timeout, 10.0),
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    return []
                raise domain_error(error, f"listing the versions of model {model!r}") from None
            versions.extend(item.version for item in response.model_versions)
            token = response.next_page_token
            if not token:
                return versions

    async def ping(self) -> bool:
        try:
            await self.stub.GetDatastoreInfo(ds.GetDatastoreInfoRequest(), timeout=3.0)
        except grpc.aio.AioRpcError:
            return False
        return True
