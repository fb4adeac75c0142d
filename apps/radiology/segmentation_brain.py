"""Automatic whole-brain segmentation of a T1 MRI (label `brain` = 1).

The sample study for it is the MNI152 T1 template at 2 mm with its brain mask as the
final label (`python -m services.datastore.sample_studies`); the model starts untrained
(seeded) like the other sample tasks and learns from that label.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from apps.api.base import InferInput, InferTask, InferType
from apps.api.transforms import ResampleToSpacing, argmax_labels
from apps.radiology.networks import small_unet


class ScaleIntensityPercentiles:
    """Maps the [lower, upper] percentiles of the volume to [0, 1], clipped (MONAI's
    ScaleIntensityRangePercentiles): MRI has no fixed unit, and this keeps a few very bright
    voxels (vessels, fat) from setting the scale."""

    def __init__(self, lower: float = 0.5, upper: float = 99.5):
        self.lower = float(lower)
        self.upper = float(upper)

    def __call__(self, item: InferInput) -> InferInput:
        image: torch.Tensor = item.data["image"]
        low, high = (float(v) for v in np.percentile(image.numpy(), [self.lower, self.upper]))
        scale = high - low if high - low > 1e-8 else 1.0
        item.data["image"] = ((image - low) / scale).clamp_(0.0, 1.0)
        return item


class SegmentationBrain(InferTask):
    type = InferType.SEGMENTATION
    dimension = 3
    # The MNI152 brain at 2 mm (99×117×95) takes 2×2×1 windows of 96³.
    roi_size = (96, 96, 96)
    target_spacing = (2.0, 2.0, 2.0)
    input_channels = 1
    seed = 14
    labels: Mapping[str, int] = {"brain": 1}
    description = "A 3D UNet that segments the brain in a T1 MRI automatically"

    def network(self) -> torch.nn.Module:
        return small_unet(self.input_channels, max(self.labels.values()) + 1)

    def pre_transforms(self, params: Mapping[str, Any]) -> Sequence[Callable[[InferInput], InferInput]]:
        return [ResampleToSpacing(self.target_spacing), ScaleIntensityPercentiles()]

    def post_transforms(self, params: Mapping[str, Any]) -> Sequence[Callable[[torch.Tensor], torch.Tensor]]:
        return [argmax_labels]
