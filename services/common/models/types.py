"""Value types for loading and running networks, shared by inference and scoring: plain data, no gRPC, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.errors import ErrorKind, LabelgridError

UNTRAINED = "untrained"
"""The version name of an app's initial weights (nothing published yet)."""

RESET_VERSION_PREFIX = "initial-"
"""A published version whose name starts with this says "serve the initial weights again"
(MONAI Label's DELETE /model, or a replaced bundle), keeping the older versions for rollback."""


class Cancelled(LabelgridError):
    """The caller went away; the inference stopped at the next stage boundary."""

    kind = ErrorKind.CANCELLED
    reason = "INFERENCE_ERROR"


@dataclass(frozen=True)
class Volume:
    """A loaded image: voxels (3D, float32 numpy) and the voxel-to-world affine (RAS, 4x4)."""

    data: Any
    affine: Any
    file_name: str
    # The file it was read from (tasks that read files themselves, such as bundles, use it).
    path: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.data.shape)


@dataclass(frozen=True)
class LoadedNetwork:
    """A network on one device, ready to run; `network` is opaque to the domain."""

    network: Any
    device: str
    version: str
    size_bytes: int
    load_seconds: float


@dataclass(frozen=True)
class RunResult:
    """What the runner computed: the label map on the image's grid, and seconds per stage."""

    label: Any
    latencies: dict[str, float]


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    kind: str  # "cpu" or "cuda"
    description: str
    memory_total_bytes: int
    memory_used_bytes: int
