"""Conversions between the inference protos and the domain: the only code that knows both.

MONAI Label's params JSON arrives in `InferParams.params`; typed fields win, and the
usual MONAI Label keys fill what the typed fields leave empty, so a gateway may pass the
viewer's JSON straight through: "foreground" / "background" ([[x, y, z], ...] voxel
indices), "label", "<label name>": [[x, y, z], ...] (DeepEdit), "result_extension",
"result_dtype", "result_compress", "save_label", "label_tag", "device".
"""

from __future__ import annotations

from typing import Any

from labelgrid.common.v1 import common_pb2
from labelgrid.inference.v1 import inference_service_pb2 as pb
from labelgrid.inference.v1 import resources_pb2 as res

from apps.api.prompt import Point, Prompt
from services.common.errors import InvalidArgument
from services.common.models.types import UNTRAINED, DeviceInfo
from services.common.protos import (
    config_entries,
    dict_to_struct,
    job_error,
    job_state,
    job_times,
    struct_to_dict,
)
from services.common.resource_names import resource_type
from services.infer.domain.batch import BatchJob
from services.infer.domain.model import (
    ImageInput,
    InferOutcome,
    InferParams,
    ModelInfo,
    ModelMetadata,
    QueueStat,
    ResultOptions,
)

_INFER_TYPES = {
    "segmentation": res.INFER_TYPE_SEGMENTATION,
    "annotation": res.INFER_TYPE_ANNOTATION,
    "classification": res.INFER_TYPE_CLASSIFICATION,
    "deepgrow": res.INFER_TYPE_DEEPGROW,
    "deepedit": res.INFER_TYPE_DEEPEDIT,
    "scribbles": res.INFER_TYPE_SCRIBBLES,
    "detection": res.INFER_TYPE_DETECTION,
    "vista3d": res.INFER_TYPE_VISTA3D,
}
_PROMPT_KEYS = {"foreground", "background", "label", "roi", "points", "point_labels", "label_prompt"}

# -- resource names ------------------------------------------------------------------------


MODEL = resource_type("labelgrid.inference/Model")
BATCH_JOB = resource_type("labelgrid.inference/BatchInferenceJob")
IMAGE = resource_type("labelgrid.datastore/Image")
LABEL = resource_type("labelgrid.datastore/Label")
MODEL_VERSION = resource_type("labelgrid.datastore/ModelVersion")
SESSION = resource_type("labelgrid.datastore/Session")


def model_of(name: str) -> str:
    return MODEL.parse(name)[0]


def image_of(name: str) -> str:
    return IMAGE.parse(name)[0]


def image_input_of(name: str) -> ImageInput:
    """The input of "images/{image}" or of a session's volume, "sessions/{session}"."""
    if name.startswith("sessions/"):
        return ImageInput(session_id=SESSION.parse(name)[0])
    return ImageInput(image_id=image_of(name))


def input_label_tag(name: str, image_id: str) -> str:
    """The tag of an input label "images/{image}/labels/{tag}", which must be of the same image."""
    label_image, tag = LABEL.parse(name)
    if label_image != image_id:
        raise InvalidArgument(f"the input label {name!r} is not a label of {IMAGE.format(image_id)}")
    return tag


def version_name(model: str, version: str) -> str:
    return "" if not version or version == UNTRAINED else MODEL_VERSION.format(model, version)


# -- params --------------------------------------------------------------------------------


def _point(value: Any, where: str) -> Point:
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
        raise InvalidArgument(f"{where}: a click must be [x, y, z] voxel indices, not {value!r}")
    if any(float(v) != int(v) for v in value):
        raise InvalidArgument(f"{where}: click {value!r} must hold whole voxel indices")
    return int(value[0]), int(value[1]), int(value[2])


def _points(value: Any, where: str) -> tuple[Point, ...]:
    if value in (None, ""):
        return ()
    if not isinstance(value, list):
        raise InvalidArgument(f"{where} must be a list of [x, y, z] clicks")
    return tuple(_point(v, where) for v in value)


def _is_click_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, list) and len(v) == 3 for v in value)


def _typed_points(points: Any) -> tuple[Point, ...]:
    return tuple((p.i, p.j, p.k) for p in points)


def prompt(message: res.Prompt, extra: dict[str, Any]) -> Prompt:
    foreground = _typed_points(message.foreground) or _points(extra.get("foreground"), "foreground")
    background = _typed_points(message.background) or _points(extra.get("background"), "background")
    label_points = {group.label: _typed_points(group.points) for group in message.label_points}
    if not label_points:
        label_points = {
            key: _points(value, key)
            for key, value in extra.items()
            if key not in _PROMPT_KEYS and _is_click_list(value)
        }
    label = message.label or str(extra.get("label") or "")
    return Prompt(label=label, foreground=foreground, background=background, label_points=label_points)


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def infer_params(message: res.InferParams) -> InferParams:
    extra = struct_to_dict(message.params)
    result = message.result
    device = message.device or extra.get("device") or ""
    if isinstance(device, list):  # MONAI Label's config choice sent back unchanged: its default
        device = device[0] if device else ""
    options = ResultOptions(
        extension=result.result_extension or str(extra.get("result_extension") or ""),
        dtype=result.result_dtype or str(extra.get("result_dtype") or ""),
        compress=result.result_compress or _flag(extra.get("result_compress", False)),
        save_label=result.save_label or _flag(extra.get("save_label", False)),
        label_tag=result.label_tag or str(extra.get("label_tag") or ""),
        params_only=result.params_only,
    )
    task_params = {k: v for k, v in extra.items() if k not in _PROMPT_KEYS and not _is_click_list(v)}
    if message.prompt.HasField("roi"):  # scribbles tasks read it (MONAI Label's `roi` param)
        roi = message.prompt.roi
        task_params["roi"] = [roi.i0, roi.i1, roi.j0, roi.j1, roi.k0, roi.k1]
    return InferParams(prompt=prompt(message.prompt, extra), result=options, device=str(device), extra=task_params)


# -- results -------------------------------------------------------------------------------


def result_header(outcome: InferOutcome) -> pb.InferResultHeader:
    latencies = outcome.latencies
    label = None
    if outcome.label_file is not None:
        file = outcome.label_file
        content_type = "application/x-nrrd" if file.file_name.endswith(".nrrd") else "application/octet-stream"
        label = common_pb2.BlobInfo(
            file_name=file.file_name,
            size_bytes=file.size_bytes,
            sha256=file.sha256,
            content_type=content_type,
            read_offset=0,
            read_size_bytes=file.size_bytes,
        )
    return pb.InferResultHeader(
        result_params=dict_to_struct(outcome.result_params),
        label_names=outcome.label_names,
        latencies=pb.InferLatencies(
            **{key: float(latencies.get(key, 0.0)) for key in pb.InferLatencies.DESCRIPTOR.fields_by_name}
        ),
        label=label,
        saved_label=outcome.saved_label,
        model_version=version_name(outcome.model, outcome.model_version),
        device=outcome.device,
    )


def device(info: DeviceInfo) -> common_pb2.Device:
    kind = common_pb2.DEVICE_KIND_CUDA if info.kind == "cuda" else common_pb2.DEVICE_KIND_CPU
    return common_pb2.Device(
        name=info.name,
        kind=kind,
        description=info.description,
        memory_total_bytes=info.memory_total_bytes,
        memory_used_bytes=info.memory_used_bytes,
    )


def model(info: ModelInfo) -> res.Model:
    return res.Model(
        name=MODEL.format(info.name),
        model_id=info.name,
        type=_INFER_TYPES.get(info.type, res.INFER_TYPE_OTHERS),
        labels=info.labels,
        labels_as_list=info.labels_as_list,
        dimension=info.dimension,
        description=info.description,
        config=config_entries(info.config),
        model_version=version_name(info.name, info.model_version),
        devices=[device(d) for d in info.devices],
    )


def queue_status(stat: QueueStat) -> pb.QueueStatus:
    return pb.QueueStatus(
        model=MODEL.format(stat.model),
        device=stat.device,
        waiting=stat.waiting,
        running=stat.running,
        queue_limit=stat.queue_limit,
        estimated_wait_seconds=stat.estimated_wait_seconds,
    )


def model_metadata(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=meta.versions,
        platform=meta.platform,
        inputs=[pb.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
        outputs=[pb.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
    )


# -- batch inference -----------------------------------------------------------------------

_BATCH_FILTERS = {
    res.BATCH_IMAGE_FILTER_UNSPECIFIED: "ALL",
    res.BATCH_IMAGE_FILTER_LABELED: "LABELED",
    res.BATCH_IMAGE_FILTER_UNLABELED: "UNLABELED",
}


def batch_job_of(name: str) -> str:
    return BATCH_JOB.parse(name)[0]


def batch_filter_name(value: int) -> str:
    if value not in _BATCH_FILTERS:
        raise InvalidArgument(f"unknown image filter {value}")
    return _BATCH_FILTERS[value]


def batch_job(value: BatchJob) -> res.BatchInferenceJob:
    """A batch job (services.infer.domain.batch) as the resource."""
    filters = {name: value for value, name in _BATCH_FILTERS.items()}
    job = res.BatchInferenceJob(
        name=BATCH_JOB.format(value.job_id),
        job_id=value.job_id,
        model=MODEL.format(value.model),
        image_filter=filters.get(value.image_filter, res.BATCH_IMAGE_FILTER_UNSPECIFIED),
        images=[IMAGE.format(image) for image in value.images],
        max_images=value.max_images,
        params=res.InferParams(
            params=dict_to_struct(value.params),
            result=res.ResultOptions(save_label=True, label_tag=value.label_tag),
        ),
        devices=list(value.devices),
        state=job_state(value.state),
        times=job_times(value),
        total_images=value.total_images,
        processed_images=value.processed_images,
        failed_images=value.failed_images,
        queue_position=value.queue_position,
        log_tail=list(value.log_tail),
        keep_results=value.keep_results,
        results=[
            res.BatchImageResult(
                image=IMAGE.format(item.image),
                label=item.label,
                label_tag=item.label_tag,
                params=dict_to_struct(item.params),
                failed=item.failed,
            )
            for item in value.results
        ],
    )
    error = job_error(value)
    if error is not None:
        job.error.CopyFrom(error)
    return job
