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

Above one device (DistributedDataParallel, one process per device) the bundle's
`configs/multi_gpu_train.json|yaml`, where present, is laid over its train config as
MONAI Label's BundleTrainTask does (`monai.bundle run --config_file "['train.json',
'multi_gpu_train.json']"`), so what it changes of the parts above (a scaled `optimizer#lr`,
other transforms) applies; MONAI Label's overrides `bundle_root`, `device` (this rank's),
`ckpt_dir` and `train#trainer#max_epochs` are set over both. Its distributed plumbing (`network`'s
DDP wrapper, samplers, `initialize` with init_process_group, handlers per rank) is not evaluated:
the training worker runs the process group, wraps the network and splits the datalist itself.
On one device the multi-GPU config is not read at all.
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
            raise BundleError(
                "a TorchScript bundle (models/model.ts) cannot be trained: it needs network_def and models/model.pt"
            )
        super().__init__(task, **config)
        self.bundle = bundle
        self.bundle_task = task
        self.description = f"Trains bundle {bundle.name} with its {bundle.train_config.name}"
        self.what = f"configs/{bundle.train_config.name}"
        self._parsers: dict[str, Any] = {}

    @property
    def bundle_root(self) -> str:
        return str(self.bundle.root)

    def configs(self, context: TrainContext) -> list[str]:
        """The config files this run reads, in order (the multi-GPU one above one device)."""
        assert self.bundle.train_config is not None
        names = [f"configs/{self.bundle.train_config.name}"]
        if context.world_size > 1 and self.bundle.multi_gpu_config is not None:
            names.append(f"configs/{self.bundle.multi_gpu_config.name}")
        return names

    def _parser(self, context: TrainContext, network: torch.nn.Module | None = None) -> Any:
        multi = self.bundle.multi_gpu_config if context.world_size > 1 else None
        parser = self.bundle.parser(self.bundle.train_config, device=context.device, over=[multi] if multi else ())
        config = parser.config
        config["ckpt_dir"] = str(self.bundle.root / "models")
        # The rank's device wins over the multi-GPU config's own (e.g. 'cuda:' + LOCAL_RANK), as
        # MONAI Label's override does; on the CPU that is what makes gloo ranks possible at all.
        config["device"] = f"$torch.device({context.device!r})"
        if "max_epochs" in context.params and "train#trainer" in parser:
            parser["train#trainer#max_epochs"] = int(context.params["max_epochs"])
        if network is not None:
            config["network"] = network
        return parser

    def _part(
        self, key: str, context: TrainContext, required: bool = True, network: torch.nn.Module | None = None
    ) -> Any:
        what = " + ".join(self.configs(context))
        return parsed(self._parser(context, network), key, self.bundle.root, what, required=required)

    def check(self) -> None:
        """Every key the run needs is there and builds, on one device and (with a multi-GPU
        config) above one; an upload is refused otherwise."""
        parser = self.bundle.parser(self.bundle.train_config)
        for key in REQUIRED_KEYS:
            if key not in parser:
                raise BundleError(f"{self.what} has no {key!r}")
        contexts = [TrainContext()]
        if self.bundle.multi_gpu_config is not None:
            contexts.append(TrainContext(world_size=2))
        for context in contexts:
            self.loss_function(context)
            self.optimizer(torch.nn.Linear(1, 1), context)
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
        return (
            self._part("validate#inferer", context, required=False) or self.bundle_task.pipeline(context.device).inferer
        )

    def train_post_transforms(self, context: TrainContext) -> Sequence[Any]:
        return _transforms(self._part("train#postprocessing", context))

    def val_post_transforms(self, context: TrainContext) -> Sequence[Any]:
        return _transforms(self._part("validate#postprocessing", context))

    def train_key_metric(self, context: TrainContext) -> dict[str, Any]:
        return self._part("train#key_metric", context, required=False) or super().train_key_metric(context)

    def val_key_metric(self, context: TrainContext) -> dict[str, Any]:
        return self._part("validate#key_metric", context)
