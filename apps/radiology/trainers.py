"""Trainers of the sample radiology app: one per model, sized for a CPU (2 mm voxels, 64³ crops).

Each trains its infer task's own network on the datastore's final labels, with the same
resampling and intensity steps the task applies at inference, so a published version is
served as it is. Deepgrow and DeepEdit learn from simulated clicks: Gaussian guidance
channels (`apps.api.transforms.click_map`, as inference builds them) at random voxels inside
and outside the labels.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.handlers import MeanDice, from_engine
from monai.inferers import Inferer, SimpleInferer
from monai.losses import DiceCELoss
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    RandCropByPosNegLabeld,
    Randomizable,
    ScaleIntensityRangePercentilesd,
    SpatialPadd,
)

from apps.api.base import InferTask
from apps.api.train import ResampleToSpacingd, TrainContext, Trainer
from apps.api.transforms import click_map

KEYS = ("image", "label")


def _crop_steps(crop: Sequence[int], samples: int) -> list[Any]:
    return [
        SpatialPadd(KEYS, spatial_size=tuple(crop)),
        RandCropByPosNegLabeld(KEYS, label_key="label", spatial_size=tuple(crop), pos=1, neg=1, num_samples=samples),
    ]


class SegmentationTrainer(Trainer):
    """Automatic segmentation: random 64³ crops around and away from the labels; validation
    on whole volumes with the task's sliding window."""

    crop_size: tuple[int, int, int] = (64, 64, 64)

    def __init__(self, task: InferTask, description: str = "", **config: Any):
        super().__init__(task, **{"num_samples": 2, **config})
        self.description = description or f"Train {type(task).__name__}: {task.description}"

    def _intensity(self) -> list[Any]:
        return [NormalizeIntensityd("image")]

    def _load(self) -> list[Any]:
        return [
            LoadImaged(KEYS, ensure_channel_first=True, image_only=True),
            ResampleToSpacingd(KEYS, self.task.target_spacing or (1.0, 1.0, 1.0)),
            *self._intensity(),
        ]

    def train_pre_transforms(self, context: TrainContext) -> Sequence[Any]:
        samples = int(context.params.get("num_samples", self.config["num_samples"]))
        return [*self._load(), *_crop_steps(self.crop_size, samples), EnsureTyped(KEYS, track_meta=False)]

    def val_pre_transforms(self, context: TrainContext) -> Sequence[Any]:
        return [*self._load(), EnsureTyped(KEYS, track_meta=False)]


class BrainTrainer(SegmentationTrainer):
    """segmentation_brain: MRI intensities scaled by percentiles, as its infer task does."""

    def _intensity(self) -> list[Any]:
        return [ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)]


class SimulateClicksd(Randomizable, MapTransform):
    """Random clicks from the label, turned into guidance channels next to the image.

    `mode="deepgrow"`: one label value present in the crop becomes the (binary) target,
    1..max_clicks foreground clicks inside it and 0..max_clicks-1 background clicks
    outside; channels image, foreground, background. `mode="deepedit"`: with probability
    `no_click_prob` no clicks at all (automatic mode), else up to max_clicks-1 clicks per
    label and for the background; channels image, one per label, background; the target
    keeps every label.
    """

    def __init__(
        self, mode: str, labels: Mapping[str, int], sigma: float = 2.0, max_clicks: int = 3, no_click_prob: float = 0.5
    ):
        MapTransform.__init__(self, KEYS)
        self.mode = mode
        self.labels = dict(labels)
        self.sigma = sigma
        self.max_clicks = max_clicks
        self.no_click_prob = no_click_prob

    def randomize(self, data: Any = None) -> None:
        pass

    def _sample(self, mask: np.ndarray, count: int) -> list[tuple[int, int, int]]:
        where = np.argwhere(mask)
        if count <= 0 or len(where) == 0:
            return []
        picks = self.R.choice(len(where), size=min(count, len(where)), replace=False)
        return [tuple(int(v) for v in where[i]) for i in picks]  # type: ignore[misc]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        image = torch.as_tensor(out["image"]).float()
        label = torch.as_tensor(out["label"])
        values = np.asarray(label[0]).astype(np.int64)
        shape = values.shape
        if self.mode == "deepgrow":
            present = [int(v) for v in np.unique(values) if v > 0]
            target = values == (int(self.R.choice(present)) if present else -1)
            fg = self._sample(target, int(self.R.randint(1, self.max_clicks + 1)))
            bg = self._sample(~target, int(self.R.randint(0, self.max_clicks)))
            channels = [click_map(shape, fg, self.sigma), click_map(shape, bg, self.sigma)]
            out["label"] = torch.from_numpy(target[None].astype(np.float32))
        else:
            clicking = self.R.random_sample() >= self.no_click_prob
            channels = []
            for index in self.labels.values():
                points = self._sample(values == index, int(self.R.randint(0, self.max_clicks))) if clicking else []
                channels.append(click_map(shape, points, self.sigma))
            bg = self._sample(values == 0, int(self.R.randint(0, self.max_clicks))) if clicking else []
            channels.append(click_map(shape, bg, self.sigma))
        out["image"] = torch.cat([image, torch.stack(channels).to(image.dtype)], dim=0)
        return out


class InteractiveTrainer(SegmentationTrainer):
    """Deepgrow / DeepEdit: crops with simulated clicks for training and validation alike."""

    mode = "deepedit"

    def train_pre_transforms(self, context: TrainContext) -> Sequence[Any]:
        samples = int(context.params.get("num_samples", self.config["num_samples"]))
        return [
            *self._load(),
            *_crop_steps(self.crop_size, samples),
            SimulateClicksd(self.mode, self.labels),
            EnsureTyped(KEYS, track_meta=False),
        ]

    def val_pre_transforms(self, context: TrainContext) -> Sequence[Any]:
        return [
            *self._load(),
            *_crop_steps(self.crop_size, 1),
            SimulateClicksd(self.mode, self.labels),
            EnsureTyped(KEYS, track_meta=False),
        ]

    def val_inferer(self, context: TrainContext) -> Inferer:
        return SimpleInferer()


class DeepgrowTrainer(InteractiveTrainer):
    """Deepgrow: one sigmoid mask for the clicked structure."""

    mode = "deepgrow"

    @property
    def out_channels(self) -> int:
        return 1

    def loss_function(self, context: TrainContext) -> torch.nn.Module:
        return DiceCELoss(sigmoid=True)

    def train_post_transforms(self, context: TrainContext) -> Sequence[Any]:
        return [Activationsd(keys="pred", sigmoid=True), AsDiscreted(keys="pred", threshold=0.5)]

    def train_key_metric(self, context: TrainContext) -> dict[str, Any]:
        return {"train_dice": MeanDice(output_transform=from_engine(["pred", "label"]), include_background=True)}

    def val_key_metric(self, context: TrainContext) -> dict[str, Any]:
        return {"val_dice": MeanDice(output_transform=from_engine(["pred", "label"]), include_background=True)}


def radiology_trainers(infer_tasks: Mapping[str, InferTask]) -> dict[str, Trainer]:
    """A trainer per model of the app, named after it."""
    trainers: dict[str, Trainer] = {}
    if "segmentation" in infer_tasks:
        trainers["segmentation"] = SegmentationTrainer(infer_tasks["segmentation"])
    if "segmentation_brain" in infer_tasks:
        trainers["segmentation_brain"] = BrainTrainer(infer_tasks["segmentation_brain"])
    if "deepgrow" in infer_tasks:
        trainers["deepgrow"] = DeepgrowTrainer(
            infer_tasks["deepgrow"], description="Train deepgrow: grow a region from simulated clicks"
        )
    if "deepedit" in infer_tasks:
        trainers["deepedit"] = InteractiveTrainer(
            infer_tasks["deepedit"], description="Train deepedit: labels from simulated clicks per label"
        )
    return trainers
