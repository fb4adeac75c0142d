"""`Client`: the generated stubs wrapped with chunking, checksums, retries, deadlines and auth."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2
from labelgrid.activelearning.v1 import activelearning_service_pb2 as al_pb
from labelgrid.activelearning.v1 import activelearning_service_pb2_grpc as al_grpc
from labelgrid.activelearning.v1 import resources_pb2 as al_resources
from labelgrid.client._errors import ChecksumMismatch, LabelgridError, from_rpc_error
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from labelgrid.datastore.v1 import resources_pb2 as ds_resources
from labelgrid.inference.v1 import inference_service_pb2 as inf_pb
from labelgrid.inference.v1 import inference_service_pb2_grpc as inf_grpc
from labelgrid.inference.v1 import resources_pb2 as inf_resources

DEFAULT_TARGET = "127.0.0.1:8000"  # `labelgrid up`'s Envoy: every service on one port
CHUNK_BYTES = 1024 * 1024  # the contracts' largest chunk
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

Progress = Callable[[int, int], None]
"""Called as transfers advance with (bytes done, total bytes; 0 when unknown)."""

T = TypeVar("T")


@dataclass(frozen=True)
class Transfer:
    """A file that arrived whole: where it is, its size and its verified sha256."""

    path: Path
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class InferResult:
    """An inference's answer: the label file (None with params_only) and what the task returned."""

    label: Transfer | None
    label_names: dict[str, int]
    result_params: dict[str, Any]
    saved_label: str  # "images/{image}/labels/{tag}" when save_label_tag was given
    model_version: str  # empty for the app's initial weights
    device: str


@dataclass(frozen=True)
class Sample:
    """The image active learning hands a client next, leased to it until lease_expire_time."""

    image_id: str
    image: al_resources.Sample = field(repr=False)
    lease_expire_time: str  # RFC 3339
    strategy_info: dict[str, Any]


@dataclass(frozen=True)
class NoSample:
    """Why active learning handed out no image (`Client.next_sample_result`): reason is the
    service's NoSampleReason without its prefix — "EMPTY" (no images), "ALL_LABELED" or
    "ALL_LEASED" (every unlabeled image is held by another client); "" if none was given.
    Falsy, so `if result:` reads as "an image was handed out"."""

    reason: str

    def __bool__(self) -> bool:
        return False


def _struct(values: Mapping[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if values:
        out.update(dict(values))
    return out


def _image_name(image_id: str) -> str:
    """An image's resource name; a session's name ("sessions/{session}") passes through, so
    `infer` runs on a session too."""
    return image_id if image_id.startswith(("images/", "sessions/")) else f"images/{image_id}"


def _session_name(session_id: str) -> str:
    return session_id if session_id.startswith("sessions/") else f"sessions/{session_id}"


def _model_name(model: str) -> str:
    return model if model.startswith("models/") else f"models/{model}"


class Client:
    """A connection to labelgrid's gRPC services (Envoy's port serves them all).

    target: "host:port". token: sent as a bearer token on every call. timeout: deadline of
    each plain call in seconds; transfer_timeout: of each upload, download and inference.
    retries: how many times a call failing with UNAVAILABLE is tried again, waiting
    backoff * 2**n seconds (at most max_backoff, with jitter) in between. secure: TLS with
    the system's roots (or root_certificates). Thread-safe; close() (or `with`) releases it.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        transfer_timeout: float = 600.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        secure: bool = False,
        root_certificates: bytes | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        if not 0 < chunk_bytes <= CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {CHUNK_BYTES}]")
        self.target, self.timeout, self.transfer_timeout = target, timeout, transfer_timeout
        self.retries, self.backoff, self.max_backoff, self.chunk_bytes = retries, backoff, max_backoff, chunk_bytes
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if secure:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._datastore = ds_grpc.DatastoreServiceStub(self._channel)
        self._inference = inf_grpc.InferenceServiceStub(self._channel)
        self._activelearning = al_grpc.ActiveLearningServiceStub(self._channel)

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _sleep_before_retry(self, attempt: int) -> None:
        delay = min(self.max_backoff, self.backoff * 2**attempt)
        time.sleep(delay * random.uniform(0.5, 1.0))

    def _retrying(self, attempt_call: Callable[[], T], *, retry: Callable[[], bool] = lambda: True) -> T:
        """Runs attempt_call, again after a backoff while it fails with UNAVAILABLE and
        `retry()` allows it; any failure ends as a LabelgridError."""
        attempt = 0
        while True:
            try:
                return attempt_call()
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries and retry():
                    self._sleep_before_retry(attempt)
                    attempt += 1
                    continue
                error = from_rpc_error(err)
                if error.code == grpc.StatusCode.UNIMPLEMENTED:  # e.g. a service the edge does not route
                    error.message = f"not served at {self.target}: {error.message}"
                raise error from None

    def _unary(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        return self._retrying(lambda: method(request, timeout=timeout or self.timeout, metadata=self._metadata))

    # -- models and images ------------------------------------------------------------------

    def list_models(self) -> list[inf_resources.Model]:
        """The models inference serves, in the app's order."""
        return list(self._unary(self._inference.ListModels, inf_pb.ListModelsRequest()).models)

    def list_images(self, *, page_size: int = 100) -> Iterator[ds_resources.Image]:
        """Every image of the datastore, page by page."""
        token = ""
        while True:
            page = self._unary(
                self._datastore.ListImages, ds_pb.ListImagesRequest(page_size=page_size, page_token=token)
            )
            yield from page.images
            token = page.next_page_token
            if not token:
                return

    def get_image(self, image_id: str) -> ds_resources.Image:
        """One image with its labels; NotFound if there is none."""
        return self._unary(self._datastore.GetImage, ds_pb.GetImageRequest(name=_image_name(image_id))).image

    def upload_image(
        self,
        path: str | os.PathLike[str],
        image_id: str = "",
        *,
        info: Mapping[str, Any] | None = None,
        replace: bool = True,
        progress: Progress | None = None,
    ) -> ds_resources.Image:
        """Uploads a NIfTI / NRRD / zipped DICOM file as a chunk stream ending in its sha256.
        image_id defaults to the file name without its extension (as MONAI Label does);
        replace=False refuses to overwrite an image with the same id."""
        source = Path(path)
        size = source.stat().st_size  # FileNotFoundError before any call
        header = ds_pb.UploadImageHeader(
            image_id=image_id, file_name=source.name, info=_struct(info), size_bytes=size, fail_if_exists=not replace
        )

        def messages() -> Iterator[ds_pb.UploadImageRequest]:
            yield ds_pb.UploadImageRequest(header=header)
            digest = hashlib.sha256()
            for chunk in self._read_chunks(source, size, progress):
                digest.update(chunk)
                yield ds_pb.UploadImageRequest(chunk=chunk)
            yield ds_pb.UploadImageRequest(finish=common_pb2.UploadFinish(sha256=digest.hexdigest()))

        def attempt() -> ds_resources.Image:
            answer = self._datastore.UploadImage(messages(), timeout=self.transfer_timeout, metadata=self._metadata)
            return answer.image

        return self._retrying(attempt)

    def _read_chunks(self, source: Path, size: int, progress: Progress | None) -> Iterator[bytes]:
        done = 0
        if progress:
            progress(0, size)
        with source.open("rb") as handle:
            while chunk := handle.read(self.chunk_bytes):
                done += len(chunk)
                if progress:
                    progress(done, size)
                yield chunk

    # -- downloads --------------------------------------------------------------------------

    def _receive(
        self,
        responses: Iterator[Any],
        dest: Path,
        progress: Progress | None,
        *,
        info_field: str,
        chunk_field: str = "chunk",
        first: Any = None,
    ) -> tuple[Any, Transfer | None]:
        """Reads 'info, then chunks' into a temp file beside dest; verifies the sha256 the
        info announced and moves the file into place. Returns (first message, transfer)."""
        head = first if first is not None else next(responses, None)
        if head is None or head.WhichOneof("payload") != info_field:
            raise LabelgridError(f"the server's stream did not start with its {info_field}")
        blob = getattr(head, info_field)
        if info_field == "header":
            if not head.header.HasField("label"):
                return head, None  # params_only, or the task wrote no file
            blob = head.header.label
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            digest, done, total = hashlib.sha256(), 0, blob.read_size_bytes or blob.size_bytes
            if progress:
                progress(0, total)
            with os.fdopen(fd, "wb") as out:
                for message in responses:
                    if message.WhichOneof("payload") != chunk_field:
                        raise LabelgridError(f"unexpected {message.WhichOneof('payload')} in the middle of a stream")
                    data = getattr(message, chunk_field)
                    digest.update(data)
                    out.write(data)
                    done += len(data)
                    if progress:
                        progress(done, total)
            whole = blob.read_offset == 0 and done == blob.size_bytes
            if whole and blob.sha256 and digest.hexdigest() != blob.sha256.lower():
                raise ChecksumMismatch(
                    f"{dest.name}: received sha256 {digest.hexdigest()}, the server announced {blob.sha256}"
                )
            if done != total:
                raise LabelgridError(f"{dest.name}: received {done} bytes, the server announced {total}")
            tmp.replace(dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return head, Transfer(dest, done, digest.hexdigest())

    def download_label(
        self,
        image_id: str,
        tag: str = "final",
        dest: str | os.PathLike[str] | None = None,
        *,
        progress: Progress | None = None,
    ) -> Transfer:
        """Downloads a label to dest (default: the server's file name in the current folder),
        verified against its sha256."""
        name = f"{_image_name(image_id)}/labels/{tag}"

        def attempt() -> Transfer:
            responses = self._datastore.DownloadLabel(
                ds_pb.DownloadLabelRequest(name=name), timeout=self.transfer_timeout, metadata=self._metadata
            )
            head = next(responses, None)
            target = Path(dest) if dest is not None else Path(head.info.file_name if head is not None else "label")
            _, transfer = self._receive(responses, target, progress, info_field="info", first=head)
            assert transfer is not None
            return transfer

        return self._retrying(attempt)

    def download_image(
        self, image_id: str, dest: str | os.PathLike[str] | None = None, *, progress: Progress | None = None
    ) -> Transfer:
        """Downloads an image to dest (default: its file name in the current folder), verified."""

        def attempt() -> Transfer:
            responses = self._datastore.DownloadImage(
                ds_pb.DownloadImageRequest(name=_image_name(image_id)),
                timeout=self.transfer_timeout,
                metadata=self._metadata,
            )
            head = next(responses, None)
            target = Path(dest) if dest is not None else Path(head.info.file_name if head is not None else image_id)
            _, transfer = self._receive(responses, target, progress, info_field="info", first=head)
            assert transfer is not None
            return transfer

        return self._retrying(attempt)

    # -- sessions ---------------------------------------------------------------------------

    def create_session(
        self,
        path: str | os.PathLike[str],
        *,
        expiry_seconds: int = 0,
        meta: Mapping[str, Any] | None = None,
        owner: str = "",
        progress: Progress | None = None,
    ) -> ds_resources.Session:
        """MONAI Label's session: uploads a volume once, then `infer(model, session.name)` reads
        it until it expires (expiry_seconds; 0 is the datastore's longest; `get_session(touch=True)`
        pushes the expiry back). Not retried: a retry after a lost answer would make a second
        session, which counts against the owner's allowance."""
        source = Path(path)
        size = source.stat().st_size  # FileNotFoundError before any call
        header = ds_pb.CreateSessionHeader(
            file_name=source.name, owner=owner, meta=_struct(meta), expiry_seconds=expiry_seconds, size_bytes=size
        )

        def messages() -> Iterator[ds_pb.CreateSessionRequest]:
            yield ds_pb.CreateSessionRequest(header=header)
            digest = hashlib.sha256()
            for chunk in self._read_chunks(source, size, progress):
                digest.update(chunk)
                yield ds_pb.CreateSessionRequest(chunk=chunk)
            yield ds_pb.CreateSessionRequest(finish=common_pb2.UploadFinish(sha256=digest.hexdigest()))

        def attempt() -> ds_resources.Session:
            answer = self._datastore.CreateSession(messages(), timeout=self.transfer_timeout, metadata=self._metadata)
            return answer.session

        return self._retrying(attempt, retry=lambda: False)

    def get_session(self, session_id: str, *, touch: bool = False) -> ds_resources.Session:
        """A live session (NotFound once it expired); touch records the access, as MONAI Label's
        update_ts, which pushes its expiry back by its lifetime."""
        request = ds_pb.GetSessionRequest(name=_session_name(session_id), touch=touch)
        return self._unary(self._datastore.GetSession, request).session

    def delete_session(self, session_id: str) -> ds_resources.Session:
        """Deletes a live session and its volume; returns it as it was."""
        request = ds_pb.DeleteSessionRequest(name=_session_name(session_id))
        return self._retrying(
            lambda: self._datastore.DeleteSession(request, timeout=self.timeout, metadata=self._metadata).session,
            retry=lambda: False,
        )

    def download_session(
        self, session_id: str, dest: str | os.PathLike[str] | None = None, *, progress: Progress | None = None
    ) -> Transfer:
        """Downloads a session's volume to dest (default: its file name in the current folder), verified."""

        def attempt() -> Transfer:
            responses = self._datastore.DownloadSession(
                ds_pb.DownloadSessionRequest(name=_session_name(session_id)),
                timeout=self.transfer_timeout,
                metadata=self._metadata,
            )
            head = next(responses, None)
            target = Path(dest) if dest is not None else Path(head.info.file_name if head is not None else "session")
            _, transfer = self._receive(responses, target, progress, info_field="info", first=head)
            assert transfer is not None
            return transfer

        return self._retrying(attempt)

    # -- inference --------------------------------------------------------------------------

    def infer(
        self,
        model: str,
        image_id: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        save_label_tag: str = "",
        params: Mapping[str, Any] | None = None,
        device: str = "",
        result_extension: str = "",
        params_only: bool = False,
        progress: Progress | None = None,
    ) -> InferResult:
        """Runs `model` on a datastore image and streams the label to dest (default: the
        server's file name). save_label_tag also stores the result as that label of the image.
        Retried on UNAVAILABLE only while no answer has arrived (it may have run otherwise)."""
        request = inf_pb.InferRequest(
            model=_model_name(model),
            image=_image_name(image_id),
            params=inf_resources.InferParams(
                result=inf_resources.ResultOptions(
                    result_extension=result_extension,
                    save_label=bool(save_label_tag),
                    label_tag=save_label_tag,
                    params_only=params_only,
                ),
                device=device,
                params=_struct(params),
            ),
        )
        return self._infer_stream(
            lambda: self._inference.Infer(request, timeout=self.transfer_timeout, metadata=self._metadata),
            dest,
            progress,
        )

    def infer_file(
        self,
        model: str,
        path: str | os.PathLike[str],
        dest: str | os.PathLike[str] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        device: str = "",
        progress: Progress | None = None,
    ) -> InferResult:
        """Runs `model` on a local file streamed to the service (nothing is stored)."""
        source = Path(path)
        size = source.stat().st_size
        header = inf_pb.InferUploadHeader(
            model=_model_name(model),
            image_file_name=source.name,
            image_size_bytes=size,
            params=inf_resources.InferParams(device=device, params=_struct(params)),
        )

        def messages() -> Iterator[inf_pb.InferUploadRequest]:
            yield inf_pb.InferUploadRequest(header=header)
            digest = hashlib.sha256()
            for chunk in self._read_chunks(source, size, None):
                digest.update(chunk)
                yield inf_pb.InferUploadRequest(image_chunk=chunk)
            yield inf_pb.InferUploadRequest(image_finish=common_pb2.UploadFinish(sha256=digest.hexdigest()))

        return self._infer_stream(
            lambda: self._inference.InferUpload(messages(), timeout=self.transfer_timeout, metadata=self._metadata),
            dest,
            progress,
        )

    def _infer_stream(
        self, start: Callable[[], Iterator[Any]], dest: str | os.PathLike[str] | None, progress: Progress | None
    ) -> InferResult:
        answered = False

        def attempt() -> InferResult:
            nonlocal answered
            responses = start()
            head = next(responses, None)
            answered = head is not None
            if head is None or head.WhichOneof("payload") != "header":
                raise LabelgridError("the inference answer did not start with its header")
            header = head.header
            target = Path(dest) if dest is not None else Path(header.label.file_name or "label")
            _, transfer = self._receive(responses, target, progress, info_field="header", first=head)
            return InferResult(
                label=transfer,
                label_names=dict(header.label_names),
                result_params=json_format.MessageToDict(header.result_params),
                saved_label=header.saved_label,
                model_version=header.model_version,
                device=header.device,
            )

        return self._retrying(attempt, retry=lambda: not answered)

    # -- active learning --------------------------------------------------------------------

    def next_sample(
        self, client_id: str, strategy: str = "random", *, params: Mapping[str, Any] | None = None
    ) -> Sample | None:
        """The next image to label for client_id, leased to it; None when nothing is left
        (`next_sample_result` says why)."""
        result = self.next_sample_result(client_id, strategy, params=params)
        return result if isinstance(result, Sample) else None

    def next_sample_result(
        self, client_id: str, strategy: str = "random", *, params: Mapping[str, Any] | None = None
    ) -> Sample | NoSample:
        """As `next_sample`, but when nothing is left a `NoSample` with the service's reason."""
        if not client_id:
            raise LabelgridError("client_id is required")
        name = strategy if strategy.startswith("strategies/") else f"strategies/{strategy}"
        answer = self._unary(
            self._activelearning.NextSample,
            al_pb.NextSampleRequest(strategy=name, client_id=client_id, params=_struct(params)),
        )
        if not answer.HasField("image"):
            reason = al_pb.NoSampleReason.Name(answer.no_sample_reason) if answer.no_sample_reason else ""
            return NoSample(reason.removeprefix("NO_SAMPLE_REASON_"))
        return Sample(
            image_id=answer.image.image_id,
            image=answer.image,
            lease_expire_time=answer.lease.expire_time.ToJsonString() if answer.lease.HasField("expire_time") else "",
            strategy_info=json_format.MessageToDict(answer.strategy_info),
        )
