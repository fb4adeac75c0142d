"""gRPC adapter of the datastore: convert the request, await the use case, convert the result.

Domain calls block on disk, S3 or SQL, so each runs in a worker thread; errors are
domain exceptions that the shared error interceptor turns into statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
from labelgrid.datastore.v1 import datastore_service_pb2 as pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry

from services.common.auth import current_identity
from services.common.bundles import check_bundle_upload
from services.common.chunks import CHUNK_SIZE, iter_file_chunks, sha256_file
from services.common.protos import struct_to_dict
from services.common.server import GrpcService
from services.common.settings import ServiceSettings
from services.common.streams import chunk_views, receive_upload, send_chunks
from services.datastore.adapters.metrics import instrument
from services.datastore.api import convert
from services.datastore.domain.datastore import BlobRead, Datastore

run = asyncio.to_thread
WATCH_HEARTBEAT_SECONDS = 10.0
"""A WatchChanges stream repeats its generation at least this often: data on the connection
between the clients' keepalive pings (30 s in the gateway), which a server without data to
send counts as strikes and answers with GOAWAY too_many_pings, dropping every call on it."""
# ReindexResponse.skipped_files: the first 100 files reindex left out, each entry cut to 300 characters.
REINDEX_SKIPS_LISTED = 100
REINDEX_SKIP_TEXT = 300


class DatastoreServicer(pb_grpc.DatastoreServiceServicer):
    def __init__(self, datastore: Datastore) -> None:
        self.ds = datastore
        self._watches: set[asyncio.Event] = set()  # one per open WatchChanges stream
        self._closing = False

    # -- info --------------------------------------------------------------------------

    async def GetDatastoreInfo(self, request: pb.GetDatastoreInfoRequest, context: Any) -> pb.GetDatastoreInfoResponse:
        return convert.datastore_info(await run(self.ds.info))

    async def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.GetStatusResponse:
        hide = (request.hidden_id_prefix, request.hidden_info_key)
        # Answered from memory when nothing changed since the last count: no thread hop.
        status = self.ds.status_if_cached(*hide)
        return convert.status(status if status is not None else await run(self.ds.status, *hide))

    async def ExportDatastoreJson(
        self, request: pb.ExportDatastoreJsonRequest, context: Any
    ) -> AsyncIterator[pb.ExportDatastoreJsonResponse]:
        hide = (request.hidden_id_prefix, request.hidden_info_key)
        body = self.ds.export_json_if_cached(*hide)
        if body is None:
            body = await run(self.ds.export_json, *hide)
        for start in range(0, len(body), CHUNK_SIZE):
            yield pb.ExportDatastoreJsonResponse(chunk=body[start : start + CHUNK_SIZE])

    async def WatchChanges(
        self, request: pb.WatchChangesRequest, context: Any
    ) -> AsyncIterator[pb.WatchChangesResponse]:
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def notify() -> None:  # called by the writing worker thread
            try:
                loop.call_soon_threadsafe(changed.set)
            except RuntimeError:  # the loop is closed: the server is gone
                pass

        stop = self.ds.watch(notify)
        self._watches.add(changed)
        try:
            while not self._closing:
                changed.clear()  # before reading: a change after this sets it again
                # Read each time: on PostgreSQL it holds only while the index listens.
                yield pb.WatchChangesResponse(generation=self.ds.generation, exclusive=self.ds.exclusive)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), WATCH_HEARTBEAT_SECONDS)
        finally:
            self._watches.discard(changed)
            stop()

    def end_watches(self) -> None:
        """Ends every WatchChanges stream (the server is stopping; watchers reconnect elsewhere)."""
        self._closing = True
        for changed in list(self._watches):
            changed.set()

    # -- images ------------------------------------------------------------------------

    async def ListImages(self, request: pb.ListImagesRequest, context: Any) -> pb.ListImagesResponse:
        page = await run(
            self.ds.list_images,
            filter=convert.image_filter(request.filter),
            tag=request.label_tag,
            order=convert.image_order(request.order),
            score_key=request.score_key,
            page_size=request.page_size,
            page_token=request.page_token,
            exclude_leased=request.exclude_leased,
        )
        return pb.ListImagesResponse(
            images=[convert.image(item) for item in page.items],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def GetImage(self, request: pb.GetImageRequest, context: Any) -> pb.GetImageResponse:
        image_id = convert.image_id_of(request.name)
        return pb.GetImageResponse(image=convert.image(await run(self.ds.get_image, image_id)))

    async def UploadImage(self, request_iterator: Any, context: Any) -> pb.UploadImageResponse:
        # On S3 the spool is sent while it arrives (domain.streaming); whatever add_image did
        # not store of it is aborted at the end (release_spool).
        header, spooled = await receive_upload(
            request_iterator, lambda h: self.ds.new_image_spool(h.size_bytes, h.image_id, h.file_name)
        )
        try:
            image = await run(
                self.ds.add_image,
                spooled,
                image_id=header.image_id,
                file_name=header.file_name,
                info=struct_to_dict(header.info),
                fail_if_exists=header.fail_if_exists,
            )
        finally:
            self.ds.release_spool(spooled.path)
        return pb.UploadImageResponse(image=convert.image(image))

    async def DownloadImage(
        self, request: pb.DownloadImageRequest, context: Any
    ) -> AsyncIterator[pb.DownloadImageResponse]:
        image_id = convert.image_id_of(request.name)
        read = await run(self.ds.read_image, image_id, request.read_offset, request.read_limit)
        async for message in _stream(read, pb.DownloadImageResponse):
            yield message

    async def DeleteImage(self, request: pb.DeleteImageRequest, context: Any) -> pb.DeleteImageResponse:
        await run(self.ds.delete_image, convert.image_id_of(request.name))
        return pb.DeleteImageResponse()

    async def UpdateImageInfo(self, request: pb.UpdateImageInfoRequest, context: Any) -> pb.UpdateImageInfoResponse:
        image = await run(
            self.ds.update_image_info,
            convert.image_id_of(request.name),
            struct_to_dict(request.info),
            replace=request.replace,
            expected_revision=convert.expected_revision(request.expected_revision),
        )
        return pb.UpdateImageInfoResponse(image=convert.image(image))

    async def SetImageScore(self, request: pb.SetImageScoreRequest, context: Any) -> pb.SetImageScoreResponse:
        image = await run(
            self.ds.set_score,
            convert.image_id_of(request.name),
            request.score_key,
            request.value,
            request.model_version,
        )
        return pb.SetImageScoreResponse(image=convert.image(image))

    # -- labels ------------------------------------------------------------------------

    async def GetLabel(self, request: pb.GetLabelRequest, context: Any) -> pb.GetLabelResponse:
        image_id, tag = convert.label_of(request.name)
        return pb.GetLabelResponse(label=convert.label(await run(self.ds.get_label, image_id, tag)))

    async def UploadLabel(self, request_iterator: Any, context: Any) -> pb.UploadLabelResponse:
        header, spooled = await receive_upload(request_iterator, lambda h: self.ds.new_spool(h.size_bytes))
        try:
            image_id = convert.image_id_of(header.image)
        except BaseException:
            Path(spooled.path).unlink(missing_ok=True)
            raise
        label = await run(
            self.ds.add_label,
            spooled,
            image_id=image_id,
            tag=header.tag,
            file_name=header.file_name,
            info=struct_to_dict(header.info),
        )
        return pb.UploadLabelResponse(label=convert.label(label))

    async def DownloadLabel(
        self, request: pb.DownloadLabelRequest, context: Any
    ) -> AsyncIterator[pb.DownloadLabelResponse]:
        image_id, tag = convert.label_of(request.name)
        read = await run(self.ds.read_label, image_id, tag, request.read_offset, request.read_limit)
        async for message in _stream(read, pb.DownloadLabelResponse):
            yield message

    async def DeleteLabel(self, request: pb.DeleteLabelRequest, context: Any) -> pb.DeleteLabelResponse:
        image_id, tag = convert.label_of(request.name)
        await run(self.ds.delete_label, image_id, tag)
        return pb.DeleteLabelResponse()

    async def UpdateLabelInfo(self, request: pb.UpdateLabelInfoRequest, context: Any) -> pb.UpdateLabelInfoResponse:
        image_id, tag = convert.label_of(request.name)
        label = await run(
            self.ds.update_label_info,
            image_id,
            tag,
            struct_to_dict(request.info),
            replace=request.replace,
            expected_revision=convert.expected_revision(request.expected_revision),
        )
        return pb.UpdateLabelInfoResponse(label=convert.label(label))

    # -- bulk access -------------------------------------------------------------------

    async def GetDownloadUrl(self, request: pb.GetDownloadUrlRequest, context: Any) -> pb.GetDownloadUrlResponse:
        kind, parts = convert.blob_name_of(request.name)
        url = await run(
            self.ds.download_url,
            kind,
            parts,
            request.expire_seconds,
            for_client=request.for_client,
            for_edge=request.for_edge,
        )
        return convert.download_url(url)

    async def ExportDataset(
        self, request: pb.ExportDatasetRequest, context: Any
    ) -> AsyncIterator[pb.ExportDatasetResponse]:
        path = await run(self.ds.export_dataset, request.limit_cases, request.label_tag)
        try:
            size = path.stat().st_size
            sha256 = await run(sha256_file, path)
            read = BlobRead("dataset.zip", size, sha256, "application/zip", 0, size, self._export_chunks(path))
            async for message in _stream(read, pb.ExportDatasetResponse):
                yield message
        finally:
            path.unlink(missing_ok=True)

    def _export_chunks(self, path: Path) -> Iterator[bytes]:
        """The archive's chunks, each read marking the export as alive (a stalled one loses its slot)."""
        for chunk in iter_file_chunks(path):
            self.ds.export_progress()
            yield chunk

    async def Reindex(self, request: pb.ReindexRequest, context: Any) -> pb.ReindexResponse:
        counts = await run(self.ds.reindex)
        return pb.ReindexResponse(
            images=counts.images,
            labels=counts.labels,
            model_versions=counts.model_versions,
            removed=counts.removed,
            skipped=len(counts.skipped),
            # bounded: a bucket of a million bad files must not make an answer over gRPC's limit
            skipped_files=[problem[:REINDEX_SKIP_TEXT] for problem in counts.skipped[:REINDEX_SKIPS_LISTED]],
        )

    # -- leases ------------------------------------------------------------------------

    async def AcquireImageLease(
        self, request: pb.AcquireImageLeaseRequest, context: Any
    ) -> pb.AcquireImageLeaseResponse:
        got = await run(
            self.ds.acquire_lease,
            request.client_id,
            request.strategy,
            order=convert.image_order(request.order),
            score_key=request.score_key,
            tag=request.label_tag,
            ttl_seconds=request.ttl_seconds,
        )
        if isinstance(got, str):
            return pb.AcquireImageLeaseResponse(no_image_reason=convert.NO_IMAGE_REASONS[got])
        image, lease = got
        return pb.AcquireImageLeaseResponse(image=convert.image(image), lease=convert.lease(lease))

    async def RenewImageLease(self, request: pb.RenewImageLeaseRequest, context: Any) -> pb.RenewImageLeaseResponse:
        lease = await run(
            self.ds.renew_lease, convert.lease_image_of(request.name), request.client_id, request.ttl_seconds
        )
        return pb.RenewImageLeaseResponse(lease=convert.lease(lease))

    async def ReleaseImageLease(
        self, request: pb.ReleaseImageLeaseRequest, context: Any
    ) -> pb.ReleaseImageLeaseResponse:
        await run(self.ds.release_lease, convert.lease_image_of(request.name), request.client_id)
        return pb.ReleaseImageLeaseResponse()

    async def ListImageLeases(self, request: pb.ListImageLeasesRequest, context: Any) -> pb.ListImageLeasesResponse:
        page = await run(self.ds.list_leases, request.client_id, request.page_size, request.page_token)
        return pb.ListImageLeasesResponse(
            leases=[convert.lease(item) for item in page.items], next_page_token=page.next_page_token
        )

    # -- models ------------------------------------------------------------------------

    async def UploadModelVersion(self, request_iterator: Any, context: Any) -> pb.UploadModelVersionResponse:
        def spool(h: Any) -> Any:
            check_bundle_upload(convert.model_of(h.model))  # a bundle is code: refused before its bytes are read
            return self.ds.new_spool(h.size_bytes)

        header, spooled = await receive_upload(request_iterator, spool)
        try:
            model = convert.model_of(header.model)
        except BaseException:
            Path(spooled.path).unlink(missing_ok=True)
            raise
        version = await run(
            self.ds.add_model_version,
            spooled,
            model=model,
            version=header.version,
            file_name=header.file_name,
            metrics=struct_to_dict(header.metrics),
            info=struct_to_dict(header.info),
        )
        return pb.UploadModelVersionResponse(model_version=convert.model_version(version))

    async def DownloadModelVersion(
        self, request: pb.DownloadModelVersionRequest, context: Any
    ) -> AsyncIterator[pb.DownloadModelVersionResponse]:
        model, version = convert.model_version_of(request.name)
        read = await run(self.ds.read_model_version, model, version, request.read_offset, request.read_limit)
        async for message in _stream(read, pb.DownloadModelVersionResponse):
            yield message

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=convert.model(await run(self.ds.get_model, convert.model_of(request.name))))

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        page = await run(self.ds.list_models, request.page_size, request.page_token)
        return pb.ListModelsResponse(
            models=[convert.model(item) for item in page.items], next_page_token=page.next_page_token
        )

    async def GetModelVersion(self, request: pb.GetModelVersionRequest, context: Any) -> pb.GetModelVersionResponse:
        model, version = convert.model_version_of(request.name)
        record = await run(self.ds.get_model_version, model, version)
        return pb.GetModelVersionResponse(model_version=convert.model_version(record))

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: Any
    ) -> pb.ListModelVersionsResponse:
        page = await run(
            self.ds.list_model_versions, convert.model_of(request.parent), request.page_size, request.page_token
        )
        return pb.ListModelVersionsResponse(
            model_versions=[convert.model_version(item) for item in page.items],
            next_page_token=page.next_page_token,
        )

    async def DeleteModelVersion(
        self, request: pb.DeleteModelVersionRequest, context: Any
    ) -> pb.DeleteModelVersionResponse:
        model, version = convert.model_version_of(request.name)
        await run(self.ds.delete_model_version, model, version)
        return pb.DeleteModelVersionResponse()

    async def PinModelVersion(self, request: pb.PinModelVersionRequest, context: Any) -> pb.PinModelVersionResponse:
        record = await run(self.ds.pin_model_version, convert.model_of(request.model), request.version)
        return pb.PinModelVersionResponse(model=convert.model(record))

    # -- records -----------------------------------------------------------------------

    async def PutRecord(self, request: pb.PutRecordRequest, context: Any) -> pb.PutRecordResponse:
        kind, record_id = convert.record_of(request.name)
        record = await run(
            self.ds.put_record,
            kind,
            record_id,
            struct_to_dict(request.data),
            convert.expected_revision(request.expected_revision),
        )
        return pb.PutRecordResponse(record=convert.record(record))

    async def GetRecord(self, request: pb.GetRecordRequest, context: Any) -> pb.GetRecordResponse:
        kind, record_id = convert.record_of(request.name)
        return pb.GetRecordResponse(record=convert.record(await run(self.ds.get_record, kind, record_id)))

    async def ListRecords(self, request: pb.ListRecordsRequest, context: Any) -> pb.ListRecordsResponse:
        page = await run(
            self.ds.list_records, convert.record_kind_of(request.parent), request.page_size, request.page_token
        )
        return pb.ListRecordsResponse(
            records=[convert.record(item) for item in page.items], next_page_token=page.next_page_token
        )

    async def DeleteRecord(self, request: pb.DeleteRecordRequest, context: Any) -> pb.DeleteRecordResponse:
        kind, record_id = convert.record_of(request.name)
        await run(self.ds.delete_record, kind, record_id, request.expected_revision or None)
        return pb.DeleteRecordResponse()

    # -- sessions ----------------------------------------------------------------------

    async def CreateSession(self, request_iterator: Any, context: Any) -> pb.CreateSessionResponse:
        header, spooled = await receive_upload(request_iterator, lambda h: self.ds.new_spool(h.size_bytes))
        session = await run(
            self.ds.create_session,
            spooled,
            file_name=header.file_name,
            owner=_session_owner(header.owner),
            meta=struct_to_dict(header.meta),
            expiry_seconds=header.expiry_seconds,
        )
        return pb.CreateSessionResponse(session=convert.session(session))

    async def GetSession(self, request: pb.GetSessionRequest, context: Any) -> pb.GetSessionResponse:
        session = await run(self.ds.get_session, convert.session_of(request.name), touch=request.touch)
        return pb.GetSessionResponse(session=convert.session(session))

    async def DownloadSession(
        self, request: pb.DownloadSessionRequest, context: Any
    ) -> AsyncIterator[pb.DownloadSessionResponse]:
        session_id = convert.session_of(request.name)
        read = await run(self.ds.read_session, session_id, request.read_offset, request.read_limit)
        async for message in _stream(read, pb.DownloadSessionResponse):
            yield message

    async def DeleteSession(self, request: pb.DeleteSessionRequest, context: Any) -> pb.DeleteSessionResponse:
        session = await run(self.ds.delete_session, convert.session_of(request.name))
        return pb.DeleteSessionResponse(session=convert.session(session))


def _session_owner(asked: str) -> str:
    """Whose allowance a session counts against: a user calling with their own token is that
    user ("user:{name}", as the gateway names them), whatever the header says; a service (the
    gateway) or a datastore without auth names the owner in the header."""
    identity = current_identity.get()
    if identity is not None and identity.service is None:
        return f"user:{identity.username}"
    return asked


def _stream(read: BlobRead, response_type: Any) -> AsyncIterator[Any]:
    return send_chunks(response_type(info=convert.blob_info(read)), read.chunks, lambda c: response_type(chunk=c))


def service_names() -> list[str]:
    """Full names of the services this process serves (for health and reflection)."""
    return [pb.DESCRIPTOR.services_by_name["DatastoreService"].full_name]


UPLOADS = {
    "UploadImage": pb.UploadImageRequest,
    "UploadLabel": pb.UploadLabelRequest,
    "UploadModelVersion": pb.UploadModelVersionRequest,
    "CreateSession": pb.CreateSessionRequest,
}
"""The upload streams, whose chunk messages are read without copying (streams.chunk_views)."""


class _Handlers:
    """Stands in for the server while the generated code registers the method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # made again from `handlers` by `register`

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, dict(handlers)


def register(server: grpc.aio.Server, datastore: Datastore) -> DatastoreServicer:
    servicer = DatastoreServicer(datastore)
    made = _Handlers()
    pb_grpc.add_DatastoreServiceServicer_to_server(servicer, made)
    handlers = {
        name: handler._replace(request_deserializer=chunk_views(UPLOADS[name])) if name in UPLOADS else handler
        for name, handler in made.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(made.service, handlers),))
    server.add_registered_method_handlers(made.service, handlers)
    return servicer


def create_service(settings: ServiceSettings, datastore: Datastore) -> GrpcService:
    """The datastore's gRPC server (not started); closing it closes the datastore.

    Its registry carries the datastore's domain metrics next to the gRPC server's.
    """
    registry = CollectorRegistry()
    metered = instrument(datastore, registry)
    servicers: list[DatastoreServicer] = []

    def end_watches() -> None:
        for servicer in servicers:
            servicer.end_watches()

    return GrpcService(
        settings,
        service_names(),
        lambda server: servicers.append(register(server, metered)),  # a Datastore, metered
        registry=registry,
        on_stop=lambda: asyncio.to_thread(datastore.close),
        on_stopping=end_watches,
    )
