"""The inference use cases: app and model info, running a task on an image, queues, devices.

Flow of one inference: resolve the task, fetch and read the image (off the loop), check
the prompt against the image, look up the served version, queue for a device slot, make
sure that version is loaded there, run, write the label file, optionally save it to the
datastore. Every stage's seconds end up in the result params, as MONAI Label reports them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from apps.api.prompt import Prompt
from services.common import raw_labels
from services.common.apps import LoadedApp
from services.common.chunks import sha256_file
from services.common.errors import InvalidArgument, LabelgridError, NotFound
from services.common.models.cache import ModelCache, ServingVersions
from services.common.models.ports import ModelRunner, VolumeIO
from services.common.models.types import UNTRAINED, DeviceInfo, Volume
from services.infer.domain.model import (
    LABEL_DTYPES,
    LABEL_EXTENSIONS,
    AppInfo,
    ImageInput,
    InferOutcome,
    InferParams,
    LabelFile,
    ModelInfo,
    ModelMetadata,
    QueueStat,
    TensorInfo,
)
from services.infer.domain.ports import DatastorePort
from services.infer.domain.scheduler import Scheduler

log = logging.getLogger("labelgrid.infer")

# Client params that size the work of one inference (MONAI's sliding window): bounded, so one
# request cannot ask for a patch or a batch that takes the device's memory or hours of CPU.
MAX_ROI_SIDE = 512
MAX_ROI_VOXELS = 256**3
MAX_SW_BATCH_SIZE = 32
MAX_SW_OVERLAP = 0.9
UPLOAD_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
# A request's scratch folder: infer-<pid>-<model>-<random>, removed when the request ends.
SCRATCH_PREFIX = "infer-"
# An InferUpload's spool: upload-<pid>-<random>.part in <work_dir>/uploads, removed when the request ends.
UPLOAD_SPOOL_PREFIX = "upload-"


def _owner_gone(name: str, prefix: str) -> bool:
    """Whether `name` (prefix + pid + "-...") belongs to a process that is gone. Our own pid
    counts as gone: called before this process makes any, so it is a previous process's (a
    restarted container often gets the same pid)."""
    pid = name[len(prefix) :].split("-", 1)[0]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
        return False  # alive (or another user's process): not ours to remove
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False


def remove_dead_scratch(work_dir: Path) -> list[Path]:
    """Removes the scratch folders of processes that are gone (killed mid-request: kill -9, an
    OOM kill), never one of a live process sharing `work_dir`; returns what it removed. Called
    before this process makes any."""
    removed = []
    for folder in work_dir.glob(f"{SCRATCH_PREFIX}*"):
        if folder.is_symlink() or not folder.is_dir() or not _owner_gone(folder.name, SCRATCH_PREFIX):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.info("removed scratch folders of processes that are gone", extra={"folders": [f.name for f in removed]})
    return removed


def upload_spool_prefix() -> str:
    """The name prefix of this process's InferUpload spools: upload-<pid>-<random>.part."""
    return f"{UPLOAD_SPOOL_PREFIX}{os.getpid()}-"


def remove_dead_uploads(upload_dir: Path) -> list[Path]:
    """Removes the InferUpload spools (upload-<pid>-*.part) of processes that are gone (killed
    mid-upload), like remove_dead_scratch; a live process sharing the folder keeps its own."""
    removed = []
    for spool in upload_dir.glob(f"{UPLOAD_SPOOL_PREFIX}*.part"):
        if spool.is_symlink() or not spool.is_file() or not _owner_gone(spool.name, UPLOAD_SPOOL_PREFIX):
            continue
        spool.unlink(missing_ok=True)
        removed.append(spool)
    if removed:
        log.info("removed upload spools of processes that are gone", extra={"files": [f.name for f in removed]})
    return removed


def _whole(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def check_window_params(extra: dict[str, Any]) -> None:
    """roi_size, sw_batch_size and sw_overlap from the client's params, within their ranges."""
    roi = extra.get("roi_size")
    if roi not in (None, "", []):
        if not isinstance(roi, (list, tuple)) or not 1 <= len(roi) <= 3 or not all(_whole(v) for v in roi):
            raise InvalidArgument(f"roi_size must be a list of 1 to 3 whole numbers, not {str(roi)[:80]}")
        sides = [int(v) for v in roi]
        if any(not 1 <= side <= MAX_ROI_SIDE for side in sides) or math.prod(sides) > MAX_ROI_VOXELS:
            raise InvalidArgument(
                f"roi_size {sides} is out of range: each side 1..{MAX_ROI_SIDE}, at most {MAX_ROI_VOXELS} voxels"
            )
    batch = extra.get("sw_batch_size")
    if batch is not None and (not _whole(batch) or not 1 <= int(batch) <= MAX_SW_BATCH_SIZE):
        raise InvalidArgument(
            f"sw_batch_size must be a whole number from 1 to {MAX_SW_BATCH_SIZE}, not {str(batch)[:40]}"
        )
    overlap = extra.get("sw_overlap")
    if overlap is not None and (
        isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap <= MAX_SW_OVERLAP
    ):
        raise InvalidArgument(f"sw_overlap must be a number from 0 to {MAX_SW_OVERLAP}, not {str(overlap)[:40]}")


def upload_file_name(file_name: str) -> str:
    """The name an uploaded image is read under: its base name, refused before any byte arrives
    unless it ends with a readable extension (and is not '.', '..' or hidden)."""
    name = file_name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    lower = name.lower()
    extension = next((e for e in UPLOAD_EXTENSIONS if lower.endswith(e)), "")
    if not extension:
        raise InvalidArgument(
            f"image file name {file_name[:100]!r}: accepted formats are {', '.join(UPLOAD_EXTENSIONS)}"
        )
    stem = name[: -len(extension)]
    if not stem or stem.startswith(".") or any(ord(c) < 32 or c in '\\/:*?"<>|' for c in name) or len(name) > 200:
        return "image" + extension
    return name


def input_label_file_name(file_name: str) -> str:
    """The name a streamed input label is read under: a readable volume or raw voxels (`.bin`)."""
    name = file_name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if raw_labels.is_raw_label(name):
        return "label" + raw_labels.RAW_LABEL_EXT
    try:
        return upload_file_name(name)
    except InvalidArgument:
        raise InvalidArgument(
            f"label file name {file_name[:100]!r}: accepted formats are "
            f"{', '.join((*UPLOAD_EXTENSIONS, raw_labels.RAW_LABEL_EXT))}"
        ) from None


def _file_stem(file_name: str) -> str:
    name = Path(file_name).name
    for extension in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd"):
        if name.lower().endswith(extension):
            return name[: -len(extension)]
    return Path(name).stem or "image"


def _extension_of(file_name: str) -> str:
    lower = file_name.lower()
    for extension in LABEL_EXTENSIONS:
        if lower.endswith(extension):
            return extension
    return ".nii.gz"


class Inference:
    """The inference service's use cases; the servicer only converts to and from these."""

    def __init__(
        self,
        app: LoadedApp,
        datastore: DatastorePort,
        runner: ModelRunner,
        volumes: VolumeIO,
        scheduler: Scheduler,
        cache: ModelCache,
        versions: ServingVersions,
        work_dir: Path,
    ):
        self.app = app
        self.datastore = datastore
        self.runner = runner
        self.volumes = volumes
        self.scheduler = scheduler
        self.cache = cache
        self.versions = versions
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        remove_dead_scratch(work_dir)

    # -- info ------------------------------------------------------------------------------

    def app_info(self) -> AppInfo:
        app = self.app
        return AppInfo(app.name, app.description, app.version, dict(app.labels), app.labels_as_list)

    def task(self, model: str) -> Any:
        return self.app.lookup("infer_tasks", model)

    async def _version_or_last_known(self, model: str) -> str:
        """For info calls: the served version, or the last one seen when the datastore is down."""
        try:
            return await self.versions.get(model)
        except Exception:  # noqa: BLE001 - info must not fail because the datastore is away
            return self.versions.known(model) or UNTRAINED

    async def model_info(self, model: str) -> ModelInfo:
        task = self.task(model)
        info = task.info()
        devices = self.devices()
        return ModelInfo(
            name=model,
            type=info["type"],
            labels=dict(info["labels"]),
            labels_as_list=False,
            dimension=int(info["dimension"]),
            description=str(info["description"]),
            config=dict(info["config"]),
            model_version=await self._version_or_last_known(model),
            devices=devices,
        )

    async def list_models(self) -> list[ModelInfo]:
        return [await self.model_info(name) for name in self.app.infer_tasks]

    def devices(self) -> list[DeviceInfo]:
        served = set(self.scheduler.devices)
        return [device for device in self.runner.devices() if device.name in served]

    def queue_status(self, model: str = "") -> list[QueueStat]:
        if model:
            self.task(model)
        stats = self.scheduler.stats(model or None)
        if model and not stats:
            # A model with no traffic yet still has a (empty) queue on every device.
            stats = [
                QueueStat(model, q.device, 0, 0, q.queue_limit, q.estimated_wait(model))
                for q in self.scheduler.queues.values()
            ]
        return stats

    async def ready(self) -> bool:
        return bool(self.app.infer_tasks) and await self.datastore.ping()

    async def model_ready(self, model: str, version: str = "") -> tuple[bool, list[str]]:
        self.task(model)
        wanted = version or await self._version_or_last_known(model)
        if version and version != UNTRAINED and version not in await self.datastore.list_versions(model):
            raise NotFound(f"model {model!r} has no version {version!r}", reason="MODEL_NOT_FOUND")
        devices = [entry.device for entry in self.cache.loaded(model) if entry.version == wanted]
        return bool(devices), devices

    async def model_metadata(self, model: str, version: str = "") -> ModelMetadata:
        task = self.task(model)
        versions = await self.datastore.list_versions(model)
        if version and version != UNTRAINED and version not in versions:
            raise NotFound(f"model {model!r} has no version {version!r}", reason="MODEL_NOT_FOUND")
        inputs, outputs = task.tensors()
        return ModelMetadata(
            name=model,
            versions=versions,
            platform="pytorch",
            inputs=[TensorInfo(*entry) for entry in inputs],
            outputs=[TensorInfo(*entry) for entry in outputs],
        )

    # -- inference ---------------------------------------------------------------------------

    def check_params(self, params: InferParams) -> None:
        """Refuses bad result options before any work is done."""
        result = params.result
        if result.extension and result.extension.lower() not in LABEL_EXTENSIONS:
            raise InvalidArgument(
                f"result_extension {result.extension!r} is not supported; use one of {', '.join(LABEL_EXTENSIONS)}"
            )
        if result.dtype and result.dtype not in LABEL_DTYPES:
            raise InvalidArgument(
                f"result_dtype {result.dtype!r} is not supported; use one of {', '.join(LABEL_DTYPES)}"
            )
        check_window_params(params.extra)
        self.scheduler.pick(params.device)  # refuses an unknown device now

    @staticmethod
    def check_prompt(prompt: Prompt, shape: tuple[int, ...], labels: dict[str, int]) -> None:
        for point in prompt.all_points():
            if len(point) != len(shape) or any(not 0 <= p < n for p, n in zip(point, shape, strict=True)):
                raise InvalidArgument(
                    f"click {list(point)} lies outside the image, whose voxel indices run to {[n - 1 for n in shape]}",
                    metadata={"point": ",".join(map(str, point)), "shape": "x".join(map(str, shape))},
                )
        unknown = [name for name in prompt.label_points if name != "background" and labels and name not in labels]
        if unknown:
            raise InvalidArgument(f"clicks for unknown labels {unknown}; the model's labels are {list(labels)}")

    async def infer(
        self,
        model: str,
        image: ImageInput,
        params: InferParams,
        deadline: float | None = None,
    ) -> InferOutcome:
        """Runs `model` on the image; the caller streams the outcome's label file, then calls cleanup().

        `deadline` is an event-loop time (loop.time()) after which queuing is pointless.
        """
        started = time.perf_counter()
        renewing = self._renew_lease(image.image_id, params.extra.get("client_id"))
        try:  # the uploaded files are removed however this ends, refused params included
            task = self.task(model)
            self.check_params(params)
            if params.result.save_label and not image.image_id:
                raise InvalidArgument("save_label needs a datastore image; an image streamed in cannot be saved to")
            work_dir = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-{model}-", dir=self.work_dir))
            try:
                return await self._infer(task, model, image, params, deadline, work_dir, started)
            except BaseException:
                shutil.rmtree(work_dir, ignore_errors=True)
                raise
        finally:
            if image.uploaded_path is not None:
                image.uploaded_path.unlink(missing_ok=True)
            if image.label_path is not None:
                image.label_path.unlink(missing_ok=True)
            if renewing is not None:
                await renewing

    def _renew_lease(self, image_id: str, client_id: Any) -> asyncio.Task[None] | None:
        """The annotator is working on the image (MONAI Label's client sends its client_id in
        every infer's params): renew the lease next-sample gave it (the datastore's default TTL),
        alongside the inference. No lease is the common case; a failure never fails the infer."""
        if not image_id or not isinstance(client_id, str) or not client_id:
            return None

        async def renew() -> None:
            try:
                await self.datastore.renew_image_lease(image_id, client_id)
            except LabelgridError as error:
                log.debug("no lease renewed", extra={"image": image_id, "reason": error.reason})

        return asyncio.create_task(renew())

    async def _infer(
        self,
        task: Any,
        model: str,
        image: ImageInput,
        params: InferParams,
        deadline: float | None,
        work_dir: Path,
        started: float,
    ) -> InferOutcome:
        queue = self.scheduler.pick(params.device)
        queue.check_room()  # a full queue refuses before the image is fetched
        fetch_started = time.perf_counter()
        if image.image_id:
            path = await self.datastore.download_image(image.image_id, work_dir)
            file_name = path.name
        elif image.session_id:
            path = await self.datastore.download_session(image.session_id, work_dir)
            file_name = path.name
        else:
            assert image.uploaded_path is not None
            # Readers pick the format by the file's name: give the spooled upload its real one
            # (checked: an accepted extension, never '..' or a path).
            file_name = upload_file_name(image.uploaded_file_name or "upload.nii.gz")
            path = work_dir / file_name
            await asyncio.to_thread(image.uploaded_path.rename, path)
        if image.label_tag:  # a stored label of the image as the input (its own folder: same file name)
            folder = work_dir / "input-label"
            folder.mkdir()
            stored = await self.datastore.download_label(image.image_id, image.label_tag, folder)
            image = dataclasses.replace(image, label_path=stored, label_file_name=stored.name)
        if image.label_path is None and getattr(task, "needs_input_label", False):
            raise InvalidArgument(f"model {model!r} needs an input label (the scribbles): send it as the `label` part")
        fetch_seconds = time.perf_counter() - fetch_started

        version = await self.versions.get(model)

        # The slot covers decoding, loading and running: the files above are on disk only, and a
        # volume is decoded (and its pre-transforms allocate) only once the request holds a slot,
        # so `queue_limit` bounds the memory of waiting requests, not only the device's work.
        async with queue.slot(model, deadline) as slot:
            decode_started = time.perf_counter()
            volume, input_label = await slot.run(
                lambda _cancelled: self._decode(task, model, image, params, path, file_name, work_dir)
            )
            decode_seconds = time.perf_counter() - decode_started
            loaded = await self.cache.get(
                model, task, queue.device, version, lambda load: slot.run(lambda _cancelled: load())
            )
            result = await slot.run(
                lambda cancelled: self.runner.run(
                    task, loaded, volume, params.prompt, params.extra, cancelled, input_label=input_label, model=model
                )
            )
        queue_seconds = slot.queue_seconds

        write_started = time.perf_counter()
        extension = (params.result.extension or _extension_of(file_name)).lower()
        dtype = params.result.dtype or "float32"
        label_path = await asyncio.to_thread(
            self.volumes.write_label,
            result.label,
            volume.affine,
            work_dir,
            _file_stem(file_name) + "_label",
            extension,
            dtype,
            params.result.compress or extension == ".nii.gz",
        )
        label_file = LabelFile(
            label_path, label_path.name, label_path.stat().st_size, await asyncio.to_thread(sha256_file, label_path)
        )
        write_seconds = time.perf_counter() - write_started

        label_names = task.label_names(params.prompt)
        saved_label = ""
        if params.result.save_label:
            tag = params.result.label_tag or "original"
            saved_label = await self.datastore.upload_label(
                image.image_id,
                tag,
                label_path,
                label_file.file_name,
                {"model": model, "model_version": loaded.version, "label_names": label_names},
            )

        latencies = {
            "queue": queue_seconds,
            "pre": result.latencies.get("pre", 0.0),
            "infer": result.latencies.get("infer", 0.0),
            "invert": result.latencies.get("invert", 0.0),
            "post": result.latencies.get("post", 0.0),
            "write": write_seconds,
            "total": time.perf_counter() - started - queue_seconds,
        }
        result_params = {
            "label_names": label_names,
            "latencies": {
                **{key: round(value, 4) for key, value in latencies.items()},
                "fetch": round(fetch_seconds, 4),
                "decode": round(decode_seconds, 4),
                "transform": {"pre": round(latencies["pre"], 4), "post": round(latencies["post"], 4)},
            },
            "model": model,
            "model_version": loaded.version,
            "device": loaded.device,
        }
        log.info(
            "inference done",
            extra={
                "model": model,
                "version": loaded.version,
                "device": loaded.device,
                "total": round(latencies["total"], 3),
            },
        )
        return InferOutcome(
            result_params=result_params,
            label_names=label_names,
            latencies=latencies,
            label_file=None if params.result.params_only else label_file,
            saved_label=saved_label,
            model=model,
            model_version=loaded.version,
            device=loaded.device,
            work_dir=work_dir,
        )

    def _decode(
        self, task: Any, model: str, image: ImageInput, params: InferParams, path: Path, file_name: str, work_dir: Path
    ) -> tuple[Volume, Any]:
        """Reads the image and input label and checks the params against them (blocking; in the slot)."""
        # A task that reads the file itself (a bundle's LoadImaged) needs only the header here.
        header_only = bool(getattr(task, "reads_files", False)) and image.label_path is None
        volume: Volume = self.volumes.read(path, file_name, header_only=header_only)
        input_label = self._read_input_label(image, volume, work_dir) if image.label_path is not None else None
        validate = getattr(task, "validate_params", None)
        if validate is not None:
            try:
                validate(params.extra, volume.shape)
            except ValueError as error:
                raise InvalidArgument(f"invalid params for model {model!r}: {error}") from None
        self.check_prompt(params.prompt, volume.shape, dict(task.labels))
        return volume, input_label

    def _read_input_label(self, image: ImageInput, volume: Volume, work_dir: Path) -> Any:
        """The streamed input label as integers on the image's grid (blocking)."""
        assert image.label_path is not None
        file_name = Path(image.label_file_name).name or "label.nii.gz"
        if raw_labels.is_raw_label(file_name):
            return raw_labels.read_raw_label(image.label_path, volume.shape, file_name)
        path = work_dir / f"input-{file_name}"  # readers pick the format by the name
        image.label_path.rename(path)
        label = self.volumes.read(path, file_name)
        if label.shape != volume.shape:
            raise InvalidArgument(
                f"the input label {file_name!r} is {'x'.join(map(str, label.shape))} voxels, "
                f"the image {'x'.join(map(str, volume.shape))}: they must match"
            )
        return np.rint(label.data).astype(np.int32)

    def close(self) -> None:
        self.scheduler.shutdown()
