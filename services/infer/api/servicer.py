"""gRPC adapter of the inference service: convert the request, await the use case, convert the result.

Torch work never runs here: the domain's scheduler puts it on the device's thread pool.
Errors are domain exceptions that the shared error interceptor turns into statuses; a
client that hangs up, or whose deadline passes, cancels the handler and with it the
inference (its queue slot is freed).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from labelgrid.inference.v1 import inference_service_pb2 as pb
from labelgrid.inference.v1 import inference_service_pb2_grpc as pb_grpc

from services.common.chunks import SpooledFile, SpoolWriter, iter_file_chunks
from services.common.errors import InvalidArgument
from services.common.jobs import JobStore
from services.common.paging import offset_page
from services.common.protos import job_state_name
from services.common.server import GrpcService
from services.common.streams import finish_sha256, send_chunks
from services.infer.adapters.batch_images import DatastoreImages
from services.infer.adapters.metrics import InferenceCollector
from services.infer.adapters.remote_infer import RemoteInfer
from services.infer.api import convert
from services.infer.domain.batch import RECORD_KIND as BATCH_RECORD_KIND
from services.infer.domain.batch import BatchInference, BatchJob
from services.infer.domain.inference import (
    Inference,
    input_label_file_name,
    remove_dead_uploads,
    upload_file_name,
    upload_spool_prefix,
)
from services.infer.domain.model import ImageInput, InferOutcome
from services.infer.settings import InferSettings


def _deadline(context: Any) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


async def _stream_outcome(outcome: InferOutcome, make: Callable[..., Any]) -> AsyncIterator[Any]:
    """Header, then the label file's chunks; the outcome's files are removed however the stream ends."""
    try:
        first = make(header=convert.result_header(outcome))
        if outcome.label_file is None:
            yield first
            return
        chunks = await asyncio.to_thread(iter_file_chunks, outcome.label_file.path)
        async for message in send_chunks(first, chunks, lambda data: make(chunk=data)):
            yield message
    finally:
        # Called directly: when the client hangs up this generator is cancelled, and an await
        # here would be cancelled too, leaving the request's scratch dir behind.
        outcome.cleanup()


async def _receive_part(
    iterator: AsyncIterator[pb.InferUploadRequest], chunk_kind: str, finish_kind: str, spool: SpoolWriter, what: str
) -> SpooledFile:
    """Reads `chunk_kind` messages into `spool` until `finish_kind`; removes the spool on any failure."""
    try:
        async for message in iterator:
            kind = message.WhichOneof("payload")
            if kind == chunk_kind:
                await asyncio.to_thread(spool.write, getattr(message, chunk_kind))
            elif kind == finish_kind:
                sha256 = finish_sha256(getattr(message, finish_kind), finish_kind, f"the {what}")
                return await asyncio.to_thread(spool.finish, sha256)
            else:
                raise InvalidArgument(f"unexpected {kind or 'empty'} message while receiving the {what}")
        raise InvalidArgument(f"the stream ended before {finish_kind}: the {what} is incomplete")
    except BaseException:
        spool.abort()
        raise


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, inference: Inference, upload_dir: Path, max_upload_bytes: int, batch: BatchInference) -> None:
        self.inference = inference
        self.batch = batch
        self.upload_dir = upload_dir
        self.max_upload_bytes = max_upload_bytes

    def _spool(self) -> SpoolWriter:
        """An InferUpload's spool, upload-<pid>-*.part: a restarted service removes those a killed
        process left (remove_dead_uploads), never a live replica's sharing the folder."""
        return SpoolWriter(self.upload_dir, self.max_upload_bytes, prefix=upload_spool_prefix())

    # -- app and models ----------------------------------------------------------------------

    async def GetAppInfo(self, request: pb.GetAppInfoRequest, context: Any) -> pb.GetAppInfoResponse:
        info = self.inference.app_info()
        return pb.GetAppInfoResponse(
            display_name=info.name,
            description=info.description,
            version=info.version,
            labels=info.labels,
            labels_as_list=info.labels_as_list,
        )

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model(m) for m in await self.inference.list_models()])

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=convert.model(await self.inference.model_info(convert.model_of(request.name))))

    # -- inference --------------------------------------------------------------------------

    async def Infer(self, request: pb.InferRequest, context: Any) -> AsyncIterator[pb.InferResponse]:
        image = convert.image_input_of(request.image)
        if request.input_label:
            if not image.image_id:
                raise InvalidArgument("input_label names a label of a datastore image; a session has none")
            image = ImageInput(
                image_id=image.image_id, label_tag=convert.input_label_tag(request.input_label, image.image_id)
            )
        outcome = await self.inference.infer(
            convert.model_of(request.model),
            image,
            convert.infer_params(request.params),
            deadline=_deadline(context),
        )
        async for message in _stream_outcome(outcome, pb.InferResponse):
            yield message

    async def InferUpload(self, request_iterator: Any, context: Any) -> AsyncIterator[pb.InferUploadResponse]:
        iterator = request_iterator.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument("empty InferUpload stream: the first message must be the header") from None
        if first.WhichOneof("payload") != "header":
            raise InvalidArgument("the first message of an InferUpload stream must be the header")
        header = first.header
        model = convert.model_of(header.model)
        self.inference.task(model)  # an unknown model is refused before any byte is received
        params = convert.infer_params(header.params)
        label_file_name = input_label_file_name(header.label_file_name) if header.label_file_name else ""
        for size, what in ((header.image_size_bytes, "image"), (header.label_size_bytes, "label")):
            if size > self.max_upload_bytes:
                raise InvalidArgument(
                    f"{what} of {size} bytes exceeds the limit of {self.max_upload_bytes} bytes",
                    reason="PAYLOAD_TOO_LARGE",
                )
        if header.image:
            image = convert.image_input_of(header.image)
        else:
            if not header.image_file_name:
                raise InvalidArgument("the header must name a datastore image or give image_file_name")
            file_name = upload_file_name(header.image_file_name)
            spool = await asyncio.to_thread(self._spool)
            spooled = await _receive_part(iterator, "image_chunk", "image_finish", spool, "image")
            image = ImageInput(uploaded_path=spooled.path, uploaded_file_name=file_name)
        if label_file_name:
            try:
                spool = await asyncio.to_thread(self._spool)
                label = await _receive_part(iterator, "label_chunk", "label_finish", spool, "label")
            except BaseException:
                if image.uploaded_path is not None:
                    image.uploaded_path.unlink(missing_ok=True)
                raise
            image = dataclasses.replace(image, label_path=label.path, label_file_name=label_file_name)
        outcome = await self.inference.infer(model, image, params, deadline=_deadline(context))
        async for message in _stream_outcome(outcome, pb.InferUploadResponse):
            yield message

    async def GetQueueStatus(self, request: pb.GetQueueStatusRequest, context: Any) -> pb.GetQueueStatusResponse:
        model = convert.model_of(request.model) if request.model else ""
        return pb.GetQueueStatusResponse(queues=[convert.queue_status(s) for s in self.inference.queue_status(model)])

    async def ListDevices(self, request: pb.ListDevicesRequest, context: Any) -> pb.ListDevicesResponse:
        devices = await asyncio.to_thread(self.inference.devices)
        return pb.ListDevicesResponse(devices=[convert.device(d) for d in devices])

    # -- Open Inference Protocol health -------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.inference.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        ready, devices = await self.inference.model_ready(convert.model_of(request.name), request.version)
        return pb.ModelReadyResponse(ready=ready, devices=devices)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        return convert.model_metadata(
            await self.inference.model_metadata(convert.model_of(request.name), request.version)
        )

    # -- batch inference ----------------------------------------------------------------------

    async def CreateBatchInferenceJob(
        self, request: pb.CreateBatchInferenceJobRequest, context: Any
    ) -> pb.CreateBatchInferenceJobResponse:
        job = request.batch_inference_job
        doc = await self.batch.create(
            convert.model_of(job.model),
            convert.infer_params(job.params),
            image_filter=convert.batch_filter_name(job.image_filter),
            images=[convert.image_of(name) for name in job.images] or None,
            max_images=job.max_images,
            devices=list(job.devices),
            enqueue=request.enqueue,
            request_id=request.request_id,
            keep_results=job.keep_results,
        )
        return pb.CreateBatchInferenceJobResponse(batch_inference_job=convert.batch_job(doc))

    async def GetBatchInferenceJob(
        self, request: pb.GetBatchInferenceJobRequest, context: Any
    ) -> pb.GetBatchInferenceJobResponse:
        doc = await self.batch.get(convert.batch_job_of(request.name))
        return pb.GetBatchInferenceJobResponse(batch_inference_job=convert.batch_job(doc))

    async def ListBatchInferenceJobs(
        self, request: pb.ListBatchInferenceJobsRequest, context: Any
    ) -> pb.ListBatchInferenceJobsResponse:
        model = convert.model_of(request.model) if request.model else ""
        docs = await self.batch.list(job_state_name(request.state), model)
        page, token = offset_page(docs, request.page_size, request.page_token, "ListBatchInferenceJobs")
        return pb.ListBatchInferenceJobsResponse(
            batch_inference_jobs=[convert.batch_job(doc) for doc in page], next_page_token=token
        )

    async def CancelBatchInferenceJob(
        self, request: pb.CancelBatchInferenceJobRequest, context: Any
    ) -> pb.CancelBatchInferenceJobResponse:
        doc = await self.batch.cancel(convert.batch_job_of(request.name))
        return pb.CancelBatchInferenceJobResponse(batch_inference_job=convert.batch_job(doc))


def service_names() -> list[str]:
    return [pb.DESCRIPTOR.services_by_name["InferenceService"].full_name]


def register(
    server: grpc.aio.Server, inference: Inference, upload_dir: Path, max_upload_bytes: int, batch: BatchInference
) -> None:
    pb_grpc.add_InferenceServiceServicer_to_server(
        InferenceServicer(inference, upload_dir, max_upload_bytes, batch), server
    )


def build_batch(
    settings: InferSettings, inference: Inference, datastore: Any, remote: RemoteInfer | None
) -> BatchInference:
    """Batch inference over the datastore's images, sized by the settings."""
    return BatchInference(
        inference,
        DatastoreImages(datastore),
        JobStore(datastore, BATCH_RECORD_KIND, BatchJob),
        width=settings.batch_width or None,
        infer_one=remote,
        max_queued=settings.max_queued_batch_jobs,
    )


def create_service(settings: InferSettings, inference: Inference, datastore: Any) -> GrpcService:
    """The inference gRPC server (not started); stopping it closes the datastore client and the pools."""
    upload_dir = settings.work_dir.resolve() / "uploads"
    remove_dead_uploads(upload_dir)  # a kill -9 mid-InferUpload left its spool there
    remote = RemoteInfer(settings.batch_address, settings.service_token) if settings.batch_address else None
    batch = build_batch(settings, inference, datastore, remote)

    async def on_stop() -> None:
        await batch.close()
        if remote is not None:
            await remote.close()
        await datastore.close()
        inference.close()

    service = GrpcService(
        settings,
        service_names(),
        lambda server: register(server, inference, upload_dir, settings.max_upload_bytes, batch),
        on_stop=on_stop,
    )
    service.registry.register(InferenceCollector(inference))
    return service
