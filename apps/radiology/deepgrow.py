"""Interactive single-label segmentation from clicks (MONAI Label's `deepgrow_3d`).

Foreground and background clicks become two Gaussian guidance channels next to the
image; the network predicts one mask, of which the regions holding a foreground click
are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from apps.api.base import InferInput, InferTask, InferType, Prompt
from apps.api.transforms import (
    AddClickGuidance,
    NormalizeIntensity,
    ResampleToSpacing,
    keep_clicked_components,
    sigmoid_threshold,
)
from apps.radiology.networks import small_unet


class Deepgrow(InferTask):
    type = InferType.DEEPGROW
    dimension = 3
    roi_size = (64, 64, 64)
    target_spacing = (2.0, 2.0, 2.0)
    input_channels = 3
    seed = 12
    labels: Mapping[str, int] = {}
    description = "A 3D UNet that grows a region from foreground / background clicks"
    # Regions without a foreground click are dropped (the click grows its own region).
    keep_clicked_regions = True

    def network(self) -> torch.nn.Module:
        return small_unet(self.input_channels, 1)

    def pre_transforms(self, params: Mapping[str, Any]) -> Sequence[Callable[[InferInput], InferInput]]:
        return [
            ResampleToSpacing(self.target_spacing),
            NormalizeIntensity(),
            AddClickGuidance(["foreground", "background"]),
        ]

    def post_transforms(self, params: Mapping[str, Any]) -> Sequence[Callable[[torch.Tensor], torch.Tensor]]:
        return [sigmoid_threshold]

    def label_names(self, prompt: Prompt) -> dict[str, int]:
        return {prompt.label or "foreground": 1}

    def tensors(self) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
        return [("image", "FP32", [-1, 3, -1, -1, -1])], [("pred", "FP32", [-1, 1, -1, -1, -1])]

    def finalize(self, label: Any, prompt: Prompt) -> Any:
        if not self.keep_clicked_regions:
            return label
        return keep_clicked_components(label, prompt.foreground)
