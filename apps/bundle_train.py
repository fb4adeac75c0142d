"""A bundle's train config as a labelgrid trainer, built by monai.bundle.ConfigParser.

The training service runs it in its child process like any app trainer (MONAI's
SupervisedTrainer and SupervisedEvaluator, checkpoints published as model versions), with
the parts taken from the bundle's `configs/train.json|yaml` in the Model Zoo's layout:
`loss`, `optimizer` (its `@network` is the network being trained), `train#preprocessing`,
`train#inferer`, `train#postprocessing`, `train#key_metric`, and the same under `validate#`.
`bundle_root`, `device` and `ckpt_dir` are overridden as MONAI Label's BundleTrainTask does.
The network is the inference config's `network_def` with the bundle's weights, so every
published checkpoint loads into inference as it is. The datalist is the datastore's labeled
images ({"image", "label"} file paths), not the bundle's own `dataset_dir`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from apps.api.train import TrainContext, Trainer
from apps.bundle import BundleError, BundleInferTask, _transforms, parsed

REQUIRED_KEYS = (
    "loss",
    "optimizer",
    "train#preprocessing",
    "train#postprocessing",
    "validate#preprocessing",
    "validate#postprocessing",
    "validate#key_metric",
)


class BundleTrainer(Trainer):
    """Trains a bundle's network with its train config's parts."""

    def __init__(self, task: BundleInferTask, **config: Any):
        bundle = task.bundle
        if bundle.train_config is None:
            raise BundleError(f"bundle {bundle.name!r} has no configs/train.json")
        if bundle.torchscript:
            raise BundleError("a TorchScript bundle (models/model.ts) cannot be trained: it needs network_def and models/model.pt")
        super().__init__(task, **config)
        self.bundle = bundle
        self.description = f"Trains bundle {bundle.name} with its {bundle.train_config.name}"
        self.what = f"configs/{bundle.train_config.name}"
        self._parsers: dict[str, Any] = {}

    @property
    def bundle_root(self) -> str:
        return str(self.bundle.root)

    def _parser(self, context: TrainContext, network: torch.nn.Module | None = None) -> Any:
        parser = self.bundle.parser(self.bundle.train_config, device=context.device)
        parser.config["ckpt_dir"] = str(self.bundle.root / "models")
        if network is not None:
            parser.config["network"] = network
        return parser

    def _part(self, key: str, context: TrainContext, required: bool = True, network: torch.nn.Module | None = None) -> Any:
        return parsed(self._parser(context, network), key, self.bundle.root, self.what, required=required)

    def check(self) -> None:
        """Every key the run needs is there and builds (an upload is refused otherwise)."""
        parser = self.bundle.parser(self.bundle.train_config)
        for key in REQUIRED_KEYS:
            if key not in parser:
                raise BundleError(f"{self.what} has no {key!r}")
        context = TrainContext()
        self.loss_function(context)
        self.train_pre_transforms(context)
        self.val_pre_transforms(context)
        self.train_key_metric(context)
        self.val_key_metric(context)

    # -- the hooks -------------------------------------------------------------------------

    def network(self, context: TrainContext) -> torch.nn.Module:
        return self.task.initial_network()

    def loss_function(self, context: TrainContext) -> torch.nn.Module:
        return self._part("loss", context)

    def optimizer(self, network: torch.nn.Module, context: TrainContext) -> torch.optim.Optimizer:
        return self._part("optimizer", context, network=network)

    def train_pre_transforms(self, context: TrainContext) -> Sequence[Any]:
        return _transforms(self._part("train#preprocessing", context))

    def val_pre_transforms(self, context: TrainContext) -> Sequence[Any]:
        return _transforms(self._part("validate#preprocessing", context))

    def train_inferer(self, context: TrainContext) -> Any:
        return self._part("train#inferer", context, required=False) or super().train_inferer(context)

    def val_inferer(self, context: TrainContext) -> Any:
        return self._part("validate#inferer", context, required=False) or self.task.pipeline(context.device).inferer

    def train_post_transforms(self, context: TrainContext) -> Sequence[Any]:
        return _transforms(self._part("train#postprocessing", context))

    def val_post_transforms(self, context: TrainContext) -> Sequence[Any]:
        return _transforms(self._part("validate#postprocessing", context))

    def train_key_metric(self, context: TrainContext) -> dict[str, Any]:
        return self._part("train#key_metric", context, required=False) or super().train_key_metric(context)

    def val_key_metric(self, context: TrainContext) -> dict[str, Any]:
        return self._part("validate#key_metric", context)
