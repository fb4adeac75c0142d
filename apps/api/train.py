"""Base class of an app's trainers: what to train and how, as MONAI Label's BasicTrainTask says it.

A `Trainer` names the infer task whose weights it trains and supplies the parts of a run:
network (the task's own, so published weights load into inference as they are), loss,
optimizer, train / validation transforms (MONAI dictionary transforms), the validation
inferer, post-transforms and key metrics, validation interval, and MONAI Label's config
defaults shown in /info. It never loads files, picks devices or spawns processes: the
training service runs it in a child process with MONAI's SupervisedTrainer and
SupervisedEvaluator.

The data dicts the transforms see hold "image" and "label" file paths; the first steps
(`LoadImaged`, `ResampleToSpacingd`) bring them onto the grid the infer task works on,
exactly as the task's own pre-transforms do at inference time.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.handlers import MeanDice, from_engine
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.transforms import MapTransform

from apps.api.base import InferTask
from apps.api.transforms import voxel_spacing

__all__ = ["ResampleToSpacingd", "TrainContext", "Trainer"]


@dataclass
class TrainContext:
    """What a run tells the trainer's hooks: its resolved params, device and rank."""

    params: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    rank: int = 0
    world_size: int = 1


class ResampleToSpacingd(MapTransform):
    """`apps.api.transforms.ResampleToSpacing` for data dicts: images trilinear, labels nearest.

    Keeps the axes (no reorientation) and computes the new shape the same way, so a
    network trains on exactly the grid inference feeds it.
    """

    def __init__(self, keys: Sequence[Hashable], spacing: Sequence[float], label_keys: Sequence[Hashable] = ("label",)):
        super().__init__(keys)
        self.spacing = tuple(float(s) for s in spacing)
        self.label_keys = set(label_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            volume = out[key]
            affine = np.asarray(getattr(volume, "affine", np.eye(4)))
            tensor = volume.as_tensor() if hasattr(volume, "as_tensor") else torch.as_tensor(np.asarray(volume))
            shape = tensor.shape[1:]
            current = voxel_spacing(affine)
            new_shape = [max(1, round(n * c / t)) for n, c, t in zip(shape, current, self.spacing, strict=True)]
            if list(new_shape) != list(shape):
                if key in self.label_keys:
                    tensor = F.interpolate(tensor[None].float(), size=new_shape, mode="nearest")[0]
                else:
                    tensor = F.interpolate(tensor[None].float(), size=new_shape, mode="trilinear", align_corners=False)[
                        0
                    ]
            out[key] = tensor.float()
        return out


class Trainer:
    """One trainer (MONAI Label's BasicTrainTask template, minus its I/O).

    Subclasses set `description` and override the hooks they need; the defaults train a
    multi-class segmentation network with Dice + cross-entropy, Adam, and Dice as the key
    metric, validating every `val_interval` epochs with the task's sliding-window inferer.
    """

    description: str = ""
    # Epochs between two validations.
    val_interval: int = 1

    def __init__(self, task: InferTask, **config: Any):
        self.task = task
        self.labels: dict[str, int] = dict(task.labels)
        # MONAI Label's trainer config: the defaults viewers show and send back (a list is a choice).
        self.config: dict[str, Any] = {
            "max_epochs": 50,
            "early_stop_patience": -1,
            "val_split": 0.2,
            "train_batch_size": 1,
            "val_batch_size": 1,
            "learning_rate": 1e-3,
            "pretrained": True,
            "amp": False,
            "dataset": ["CacheDataset", "Dataset"],
            "dataloader": ["ThreadDataLoader", "DataLoader"],
            **config,
        }

    # -- /info -------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"description": self.description, "config": dict(self.config)}
        if self.labels:
            out["labels"] = dict(self.labels)
        return out

    def accepts(self, label_values: set[int]) -> bool:
        """Whether a label with these values is one of this trainer's (a datastore may hold labels
        of several models: the brain mask and the spheres' labels); default: only known indices."""
        if not self.labels:
            return True
        return label_values <= {0, *self.labels.values()}

    # -- the run -----------------------------------------------------------------------------

    @property
    def out_channels(self) -> int:
        return max(self.labels.values(), default=0) + 1

    def network(self, context: TrainContext) -> torch.nn.Module:
        """The infer task's network with its initial weights (what inference loads a version into)."""
        return self.task.initial_network()

    def loss_function(self, context: TrainContext) -> torch.nn.Module:
        return DiceCELoss(to_onehot_y=True, softmax=True)

    def optimizer(self, network: torch.nn.Module, context: TrainContext) -> torch.optim.Optimizer:
        return torch.optim.Adam(network.parameters(), lr=float(context.params.get("learning_rate", 1e-3)))

    def train_pre_transforms(self, context: TrainContext) -> Sequence[Any]:
        raise NotImplementedError

    def val_pre_transforms(self, context: TrainContext) -> Sequence[Any]:
        raise NotImplementedError

    def train_inferer(self, context: TrainContext) -> Inferer:
        return SimpleInferer()

    def val_inferer(self, context: TrainContext) -> Inferer:
        return SlidingWindowInferer(roi_size=tuple(self.task.roi_size), sw_batch_size=1, overlap=0.25, mode="gaussian")

    def train_post_transforms(self, context: TrainContext) -> Sequence[Any]:
        """From logits and labels to one-hot masks the metric compares."""
        from monai.transforms import Activationsd, AsDiscreted

        return [
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=(self.out_channels, self.out_channels)),
        ]

    def val_post_transforms(self, context: TrainContext) -> Sequence[Any]:
        return self.train_post_transforms(context)

    def train_key_metric(self, context: TrainContext) -> dict[str, Any]:
        return {"train_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]), include_background=False)}

    def val_key_metric(self, context: TrainContext) -> dict[str, Any]:
        return {"val_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]), include_background=False)}
