"""The app `labelgrid up --app bench.labelgrid_app` serves in bench/compare.py: the network of
bench/monailabel_app (a randomly initialised 3D UNet 8-16-32-64, strides 2, no residual units,
sliding window 96³, batch 1, overlap 0.25, min-max intensity scaling, argmax), so both servers
run the same forward pass; the strategies and scoring of the sample app (random, first, ...)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import UNet

from apps.api.activelearning import ScoringMethod, Strategy
from apps.api.base import InferInput, InferTask, InferType
from apps.api.transforms import argmax_labels

NAME = "bench"
DESCRIPTION = "labelgrid bench app: the network of bench/monailabel_app"
VERSION = "0.1"
LABELS = {"sphere_a": 1, "sphere_b": 2}


def _scale_intensity(item: InferInput) -> InferInput:
    """MONAI's ScaleIntensityd (min-max to [0, 1]), as bench/monailabel_app does."""
    image: torch.Tensor = item.data["image"]
    low, high = float(image.min()), float(image.max())
    item.data["image"] = (image - low) / (high - low) if high > low else image * 0.0
    return item


class Segmentation(InferTask):
    type = InferType.SEGMENTATION
    dimension = 3
    roi_size = (96, 96, 96)
    input_channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.labels = dict(LABELS)
        self.description = "A 3D UNet that segments sphere_a, sphere_b automatically"

    def network(self) -> torch.nn.Module:
        return UNet(
            spatial_dims=3, in_channels=1, out_channels=len(LABELS) + 1,
            channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=0,
        )  # fmt: skip

    def pre_transforms(self, params: Mapping[str, Any]) -> Sequence[Callable[[InferInput], InferInput]]:
        return [_scale_intensity]

    def post_transforms(self, params: Mapping[str, Any]) -> Sequence[Callable[[torch.Tensor], torch.Tensor]]:
        return [argmax_labels]


def infer_tasks() -> dict[str, InferTask]:
    return {"segmentation": Segmentation()}


def strategies() -> dict[str, Strategy]:
    from apps.radiology.activelearning import strategies as radiology_strategies

    return radiology_strategies()


def scoring_methods() -> dict[str, ScoringMethod]:
    from apps.radiology.activelearning import scoring_methods as radiology_scoring_methods

    return radiology_scoring_methods()
