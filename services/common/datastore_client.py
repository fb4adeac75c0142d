"""The datastore, over gRPC, as every other service uses it: images, labels and weights
down to files, labels and weights up, versions and records looked up.

Failures come back as domain errors with the datastore's own reason (IMAGE_NOT_FOUND,
MODEL_NOT_FOUND ...), so a client of the inference service sees the same reason it would
see from the datastore; an unreachable datastore is STORAGE_ERROR (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as ds
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from labelgrid.datastore.v1 import resources_pb2 as ds_res

from services.common.chunks import CHUNK_SIZE
from services.common.errors import ErrorKind, LabelgridError, StorageError
from services.common.grpc_errors import error_details
from services.common.models.types import RESET_VERSION_PREFIX
from services.common.protos import dict_to_struct, struct_to_dict
from services.common.resource_names import resource_type

IMAGE = resource_type("labelgrid.datastore/Image")
LABEL = resource_type("labelgrid.datastore/Label")
MODEL = resource_type("labelgrid.datastore/Model")
MODEL_VERSION = resource_type("labelgrid.datastore/ModelVersion")
LEASE = resource_type("labelgrid.datastore/Lease")
RECORD = resource_type("labelgrid.datastore/Record")
RECORD_KIND = resource_type("labelgrid.datastore/RecordKind")
SESSION = resource_type("labelgrid.datastore/Session")

T = TypeVar("T")


def domain_error(rpc_error: grpc.aio.AioRpcError, what: str) -> LabelgridError:
    """The datastore's failure as a domain error of the same kind and reason."""
    details = error_details(rpc_error)
    if details.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN):
        return StorageError(f"the datastore failed while {what}: {details.message or details.code.name}")
    error = LabelgridError(
        details.message or f"the datastore failed while {what}", reason=details.reason, metadata=details.metadata
    )
    try:
        error.kind = ErrorKind[details.code.name]
    except KeyError:
        error.kind = ErrorKind.INTERNAL
    return error


class _BearerToken:
    """Adds `authorization: Bearer <token>` to every call (the datastore's auth, when it is on)."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self.header]
        return details._replace(metadata=grpc.aio.Metadata(*metadata))


# One class per call shape: grpc.aio files an interceptor under the first shape it is an
# instance of only, so one class of all four shapes left streaming calls without the token.
class _UnaryUnaryToken(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _UnaryStreamToken(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _StreamUnaryToken(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


class _StreamStreamToken(_BearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


def token_interceptors(token: str) -> list[Any]:
    """Client interceptors sending `token` on calls of every shape."""
    return [shape(token) for shape in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)]


class DatastoreClient:
    """The datastore over one grpc.aio channel (created lazily on the serving loop).

    `token` is sent as a bearer token on every call (the service's own token,
    LABELGRID_AUTH_SERVICE_TOKEN, or a static one); empty sends none.
    """

    def __init__(self, address: str, timeout_seconds: float = 120.0, token: str = ""):
        self.address = address
        self.timeout = timeout_seconds
        self.token = token
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
                interceptors=token_interceptors(self.token) if self.token else None,
            )
            self._stub = ds_grpc.DatastoreServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None

    async def call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Runs one unary call; a failure becomes the domain error of the datastore's reason."""
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
        call = self.stub.DownloadImage(ds.DownloadImageRequest(name=IMAGE.format(image_id)), timeout=self.timeout)
        return await self._download(call, dest_dir, f"{image_id}.nii.gz", f"reading image {image_id!r}")

    async def download_session(self, session_id: str, dest_dir: Path) -> Path:
        """A session's volume (MONAI Label's session_id), under the file name it was uploaded with."""
        call = self.stub.DownloadSession(
            ds.DownloadSessionRequest(name=SESSION.format(session_id)), timeout=self.timeout
        )
        return await self._download(call, dest_dir, "session.nii.gz", f"reading session {session_id!r}")

    async def download_label(self, image_id: str, tag: str, dest_dir: Path) -> Path:
        call = self.stub.DownloadLabel(ds.DownloadLabelRequest(name=LABEL.format(image_id, tag)), timeout=self.timeout)
        return await self._download(
            call, dest_dir, f"{image_id}.nii.gz", f"reading the {tag!r} label of image {image_id!r}"
        )

    async def download_model_version(self, model: str, version: str, dest_dir: Path) -> Path:
        call = self.stub.DownloadModelVersion(
            ds.DownloadModelVersionRequest(name=MODEL_VERSION.format(model, version)), timeout=self.timeout
        )
        return await self._download(call, dest_dir, "model.pt", f"reading version {version!r} of model {model!r}")

    async def upload_label(self, image_id: str, tag: str, path: Path, file_name: str, info: dict[str, Any]) -> str:
        info_struct = struct_pb2.Struct()
        info_struct.update(info)
        header = ds.UploadLabelHeader(
            image=IMAGE.format(image_id),
            tag=tag,
            file_name=file_name,
            info=info_struct,
            size_bytes=path.stat().st_size,
        )
        messages = _upload_messages(ds.UploadLabelRequest, ds.UploadLabelRequest(header=header), path)
        response = await self.call(
            f"saving the label of image {image_id!r}", lambda: self.stub.UploadLabel(messages, timeout=self.timeout)
        )
        return response.label.name or LABEL.format(image_id, tag)

    async def upload_model_version(
        self, model: str, path: Path, *, metrics: dict[str, Any], info: dict[str, Any], version: str = ""
    ) -> ds_res.ModelVersion:
        """Publishes a weights file as a new version of `model` (numbered by the datastore when empty)."""
        header = ds.UploadModelVersionHeader(
            model=MODEL.format(model), version=version, file_name=path.name, metrics=dict_to_struct(metrics),
            info=dict_to_struct(info), size_bytes=path.stat().st_size,
        )  # fmt: skip
        messages = _upload_messages(ds.UploadModelVersionRequest, ds.UploadModelVersionRequest(header=header), path)
        response = await self.call(
            f"publishing a version of model {model!r}",
            lambda: self.stub.UploadModelVersion(messages, timeout=self.timeout),
        )
        return response.model_version

    async def list_images(
        self,
        *,
        filter: int = ds.IMAGE_FILTER_UNSPECIFIED,
        label_tag: str = "final",
        order: int = ds.IMAGE_ORDER_UNSPECIFIED,
        score_key: str = "",
        exclude_leased: bool = False,
    ) -> list[ds_res.Image]:
        """Every image matching the filter, all pages, in the datastore's order."""
        images: list[ds_res.Image] = []
        token = ""
        while True:
            request = ds.ListImagesRequest(
                page_size=1000, page_token=token, filter=filter, label_tag=label_tag, order=order,
                score_key=score_key, exclude_leased=exclude_leased,
            )  # fmt: skip
            response = await self.call("listing images", partial(self.stub.ListImages, request, timeout=self.timeout))
            images.extend(response.images)
            token = response.next_page_token
            if not token:
                return images

    async def get_download_url(self, name: str, expire_seconds: int = 3600) -> ds.GetDownloadUrlResponse:
        """A URL for a blob (presigned http(s) on s3, file:// on the local backend) with its size and sha256."""
        request = ds.GetDownloadUrlRequest(name=name, expire_seconds=expire_seconds)
        return await self.call(
            f"asking for a URL of {name!r}", lambda: self.stub.GetDownloadUrl(request, timeout=self.timeout)
        )

    async def renew_image_lease(self, image_id: str, client_id: str, ttl_seconds: int = 0) -> None:
        """Extends `client_id`'s lease on the image (ttl 0: the datastore's default); NOT_FOUND
        (LEASE_NOT_FOUND) when that client holds none."""
        request = ds.RenewImageLeaseRequest(name=LEASE.format(image_id), client_id=client_id, ttl_seconds=ttl_seconds)
        await self.call(
            f"renewing the lease of {client_id!r} on image {image_id!r}",
            lambda: self.stub.RenewImageLease(request, timeout=5.0),  # short: it must not hold up an infer
        )

    # -- records: small JSON documents (job records, stats) ---------------------------------

    async def put_record(self, kind: str, record_id: str, data: dict[str, Any], expected_revision: int = 0) -> int:
        """Stores a document; returns its new revision (ABORTED if expected_revision no longer matches)."""
        request = ds.PutRecordRequest(
            name=RECORD.format(kind, record_id), data=dict_to_struct(data), expected_revision=expected_revision
        )
        response = await self.call(
            f"storing record {kind}/{record_id}", lambda: self.stub.PutRecord(request, timeout=self.timeout)
        )
        return response.record.revision

    async def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None:
        """The document, or None if there is none."""
        request = ds.GetRecordRequest(name=RECORD.format(kind, record_id))
        try:
            response = await self.stub.GetRecord(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise domain_error(error, f"reading record {kind}/{record_id}") from None
        return struct_to_dict(response.record.data)

    async def list_records(self, kind: str) -> list[dict[str, Any]]:
        """Every document of a kind, in id order."""
        documents: list[dict[str, Any]] = []
        token = ""
        while True:
            request = ds.ListRecordsRequest(parent=RECORD_KIND.format(kind), page_size=1000, page_token=token)
            response = await self.call(
                f"listing records {kind}", partial(self.stub.ListRecords, request, timeout=self.timeout)
            )
            documents.extend(struct_to_dict(record.data) for record in response.records)
            token = response.next_page_token
            if not token:
                return documents

    async def delete_record(self, kind: str, record_id: str, expected_revision: int = 0) -> None:
        """Deletes the record; with `expected_revision` only while it is still at that revision."""
        request = ds.DeleteRecordRequest(name=RECORD.format(kind, record_id), expected_revision=expected_revision)
        await self.call(
            f"deleting record {kind}/{record_id}", lambda: self.stub.DeleteRecord(request, timeout=self.timeout)
        )

    async def serving_version(self, model: str) -> str | None:
        try:
            response = await self.stub.GetModel(
                ds.GetModelRequest(name=MODEL.format(model)), timeout=min(self.timeout, 10.0)
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None  # nothing published yet: the app's initial weights
            raise domain_error(error, f"looking up the served version of model {model!r}") from None
        serving = response.model.serving_version or None
        if serving and serving.startswith(RESET_VERSION_PREFIX):
            return None  # reset to the initial weights (DELETE /model), history kept
        return serving

    async def list_versions(self, model: str) -> list[str]:
        versions: list[str] = []
        token = ""
        while True:
            try:
                response = await self.stub.ListModelVersions(
                    ds.ListModelVersionsRequest(parent=MODEL.format(model), page_size=1000, page_token=token),
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


async def _upload_messages(message_type: Any, header: Any, path: Path) -> AsyncIterator[Any]:
    """A header / ≤1 MiB chunks / finish(sha256) stream of one file, read off the event loop."""
    yield header
    digest = hashlib.sha256()
    file = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(file.read, CHUNK_SIZE):
            digest.update(chunk)
            yield message_type(chunk=chunk)
    finally:
        file.close()
    yield message_type(finish=common_pb2.UploadFinish(sha256=digest.hexdigest()))
