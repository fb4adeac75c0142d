"""Interactive multi-label segmentation (MONAI Label's `deepedit`): clicks per label.

One guidance channel per label plus one for background clicks; with no clicks at all it
works as automatic segmentation, as DeepEdit does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from apps.api.base import InferInput, InferTask, InferType
from apps.api.transforms import (
    AddClickGuidance,
    NormalizeIntensity,
    ResampleToSpacing,
    argmax_labels,
)
from apps.radiology.networks import small_unet


class DeepEdit(InferTask):
    type = InferType.DEEPEDIT
    dimension = 3
    roi_size = (64, 64, 64)
    target_spacing = (2.0, 2.0, 2.0)
    seed = 13

    def __init__(self, labels: Mapping[str, int]):
        super().__init__()
        self.labels = dict(labels)
        self.input_channels = 1 + len(self.labels) + 1
        self.description = "A 3D UNet that segments " + ", ".join(self.labels) + " and takes clicks per label"

    def network(self) -> torch.nn.Module:
        return small_unet(self.input_channels, max(self.labels.values()) + 1)

    def pre_transforms(self, params: Mapping[str, Any]) -> Sequence[Callable[[InferInput], InferInput]]:
        return [
            ResampleToSpacing(self.target_spacing),
            NormalizeIntensity(),
            AddClickGuidance([*self.labels, "background"]),
        ]

    def post_transforms(self, params: Mapping[str, Any]) -> Sequence[Callable[[torch.Tensor], torch.Tensor]]:
        return [argmax_labels]
