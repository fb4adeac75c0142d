"""The inference service's domain types: plain data, no gRPC, no torch.

The types for loading and running networks, shared with scoring, are in `services.common.models.types`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apps.api.prompt import Prompt
from services.common.errors import ErrorKind, LabelgridError
from services.common.models.types import DeviceInfo

LABEL_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
LABEL_DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "float32", "float64")


class DeadlineExceeded(LabelgridError):
    """The request's deadline passed before its inference could run."""

    kind = ErrorKind.DEADLINE_EXCEEDED
    reason = "INFERENCE_ERROR"


@dataclass(frozen=True)
class ResultOptions:
    """How the label file is written and kept (MONAI Label's result_* and save_label params)."""

    extension: str = ""
    dtype: str = ""
    compress: bool = False
    save_label: bool = False
    label_tag: str = ""
    params_only: bool = False


@dataclass(frozen=True)
class InferParams:
    prompt: Prompt = field(default_factory=Prompt)
    result: ResultOptions = field(default_factory=ResultOptions)
    device: str = ""
    # Free-form task params (MONAI Label's params JSON minus what the typed fields say).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageInput:
    """Where the image comes from: a datastore image id, or a file streamed in (then deleted);
    and the input label, if one was given."""

    image_id: str = ""
    # Or a session's volume (MONAI Label's session_id), read from the datastore by its id.
    session_id: str = ""
    uploaded_path: Path | None = None
    uploaded_file_name: str = ""
    # An input label streamed in (scribbles; MONAI Label's `label` part), deleted after use:
    # a volume on the image's grid, or raw voxels (`.bin`, OHIF v2).
    label_path: Path | None = None
    label_file_name: str = ""
    # Or a stored label of the same datastore image as the input label (its tag).
    label_tag: str = ""


@dataclass
class LabelFile:
    path: Path
    file_name: str
    size_bytes: int
    sha256: str


@dataclass
class InferOutcome:
    """One finished inference. The owner streams `label_file` and then calls `cleanup`."""

    result_params: dict[str, Any]
    label_names: dict[str, int]
    latencies: dict[str, float]
    label_file: LabelFile | None
    saved_label: str
    model: str
    model_version: str
    device: str
    work_dir: Path | None = None

    def cleanup(self) -> None:
        import shutil

        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None


@dataclass(frozen=True)
class QueueStat:
    model: str
    device: str
    waiting: int
    running: int
    queue_limit: int
    estimated_wait_seconds: float


@dataclass(frozen=True)
class ModelInfo:
    """One served model as /info shows it, plus the version it serves now."""

    name: str
    type: str
    labels: dict[str, int]
    labels_as_list: bool
    dimension: int
    description: str
    config: dict[str, Any]
    model_version: str
    devices: list[DeviceInfo]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


@dataclass(frozen=True)
class AppInfo:
    name: str
    description: str
    version: str
    labels: dict[str, int]
    labels_as_list: bool
