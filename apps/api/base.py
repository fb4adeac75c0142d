"""Base classes of an app's tasks: plain Python and MONAI, no gRPC.

`InferTask` keeps MONAI Label's BasicInferTask template (network, pre-transforms,
inferer, post-transforms, type, labels, dimension, description, config) but leaves
loading, devices, caching and files to the inference service: a task only says *what*
to compute, so it runs unchanged on any device and in any process.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer

from apps.api.prompt import Point, Prompt

__all__ = ["InferInput", "InferTask", "InferType", "Point", "Prompt"]

# Serialises seeded network builds: two at once would reseed the shared global generator mid-build.
_seeded_build_lock = threading.Lock()


class InferType(str, enum.Enum):
    """What a model does (MONAI Label's InferType); the value is MONAI Label's string."""

    SEGMENTATION = "segmentation"
    ANNOTATION = "annotation"
    CLASSIFICATION = "classification"
    DEEPGROW = "deepgrow"
    DEEPEDIT = "deepedit"
    SCRIBBLES = "scribbles"
    DETECTION = "detection"
    VISTA3D = "vista3d"
    OTHERS = "others"


@dataclass
class InferInput:
    """One inference's input after loading: the data dict the transforms work on.

    `data["image"]` is a float32 tensor (channels first) on the model's grid once the
    pre-transforms ran; `prompt` is already mapped onto that grid.
    """

    data: dict[str, Any]
    prompt: Prompt
    params: dict[str, Any]


class InferTask:
    """One model an app serves (MONAI Label's BasicInferTask, minus its I/O).

    Subclasses set the class attributes and implement `network`; the defaults give a
    sliding-window inferer over `roi_size` and transforms that do nothing.
    """

    type: InferType = InferType.SEGMENTATION
    labels: Mapping[str, int] = {}
    dimension: int = 3
    description: str = ""
    # Input channels the network expects (image + guidance channels for interactive models).
    input_channels: int = 1
    # Patch of the sliding-window inferer; volumes larger than this are tiled.
    roi_size: tuple[int, ...] = (64, 64, 64)
    # Voxel spacing (mm) the network works at; None keeps the image's.
    target_spacing: tuple[float, ...] | None = None
    # Seed of the untrained weights, so that two replicas (and two test runs) agree.
    seed: int = 0
    # A task that reads the image file itself (a MONAI Bundle: its own LoadImaged ... Invertd)
    # sets this and implements `infer_file`; the runner then skips the template's steps.
    reads_files: bool = False

    def __init__(self) -> None:
        # User-settable options, MONAI Label style: a list value is a choice, default first.
        self.config: dict[str, Any] = {"sw_batch_size": 1, "sw_overlap": 0.25}

    # -- what MONAI Label's /info shows --------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "type": self.type.value,
            "labels": dict(self.labels),
            "dimension": self.dimension,
            "description": self.description,
            "config": dict(self.config),
        }

    def is_valid(self) -> bool:
        return True

    # -- the template ---------------------------------------------------------------------

    def network(self) -> torch.nn.Module:
        raise NotImplementedError

    def initial_network(self) -> torch.nn.Module:
        """The network with the app's initial (untrained, seeded) weights, on the CPU."""
        # Layer constructors draw from torch's global generator and take no generator of their own:
        # seed it for this build only, one build at a time, and give the caller its state back.
        with _seeded_build_lock, torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.network()

    def pre_transforms(self, params: Mapping[str, Any]) -> Sequence[Callable[[InferInput], InferInput]]:
        """Steps applied after loading, before the network (resample, normalise, guidance)."""
        return []

    def inferer(self, params: Mapping[str, Any]) -> Inferer:
        """Sliding window over `roi_size`; MONAI pads a volume smaller than the patch."""
        if self.dimension != 3:
            return SimpleInferer()
        return SlidingWindowInferer(
            roi_size=tuple(int(v) for v in params.get("roi_size") or self.roi_size),
            sw_batch_size=int(params.get("sw_batch_size", self.config.get("sw_batch_size", 1))),
            overlap=float(params.get("sw_overlap", self.config.get("sw_overlap", 0.25))),
            mode="gaussian",
        )

    def post_transforms(self, params: Mapping[str, Any]) -> Sequence[Callable[[torch.Tensor], torch.Tensor]]:
        """Steps from the network's logits (1, C, ...) to a label map (spatial dims only, ints)."""
        return []

    def infer_file(
        self,
        network: torch.nn.Module,
        path: Any,
        device: str,
        check: Callable[[], None],
        latencies: dict[str, float],
        prompt: Prompt | None = None,
    ) -> Any:
        """Only for `reads_files` tasks: the label map (spatial dims, ints, on the image's grid) of the
        image file at `path` (and the user's `prompt`, for interactive models); calls `check()`
        between stages (it raises when the caller hung up) and puts the seconds of "pre", "infer"
        and "post" into `latencies`."""
        raise NotImplementedError

    def finalize(self, label: Any, prompt: Prompt) -> Any:
        """Last step on the label map (numpy, original grid, original prompt); default: as is."""
        return label

    def label_names(self, prompt: Prompt) -> dict[str, int]:
        """Label names to the values written in the result (MONAI Label's result `label_names`)."""
        return dict(self.labels)

    def tensors(self) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
        """(inputs, outputs) as (name, datatype, shape) for the Open Inference Protocol's metadata."""
        spatial = [-1] * self.dimension
        inputs = [("image", "FP32", [-1, self.input_channels, *spatial])]
        outputs = [("pred", "FP32", [-1, max(len(self.labels) + 1, 1), *spatial])]
        return inputs, outputs
