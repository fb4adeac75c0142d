"""The MONAI Label 0.8.5 app bench/compare.py serves: the network bench/labelgrid_app serves in
labelgrid (a randomly initialised 3D UNet 8-16-32-64, sliding window 96³) as one BasicInferTask, plus
MONAI Label's own `random` and `first` strategies. Runs only in bench/.venv-monailabel."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from monai.inferers import Inferer, SlidingWindowInferer
from monai.networks.nets import UNet
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    ScaleIntensityd,
    SqueezeDimd,
)
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.basic_infer import BasicInferTask

LABELS = {"sphere_a": 1, "sphere_b": 2}


class Segmentation(BasicInferTask):
    def __init__(self) -> None:
        network = UNet(
            spatial_dims=3, in_channels=1, out_channels=len(LABELS) + 1,
            channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=0,
        )  # fmt: skip
        super().__init__(
            path=None, network=network, type=InferType.SEGMENTATION, labels=LABELS, dimension=3,
            description="A 3D UNet that segments sphere_a, sphere_b automatically",
            config={"sw_batch_size": 1, "sw_overlap": 0.25},
        )  # fmt: skip

    def is_valid(self) -> bool:
        return True

    def pre_transforms(self, data: Any = None) -> Sequence[Callable]:
        return [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            ScaleIntensityd(keys="image"),
            EnsureTyped(keys="image"),
        ]

    def inferer(self, data: Any = None) -> Inferer:
        return SlidingWindowInferer(roi_size=(96, 96, 96), sw_batch_size=1, overlap=0.25)

    def post_transforms(self, data: Any = None) -> Sequence[Callable]:
        return [
            # MONAI annotates device as torch.device only; it passes it on to torch, which takes "cpu"
            EnsureTyped(keys="pred", device="cpu"),  # type: ignore[arg-type]
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys="pred", argmax=True),
            SqueezeDimd(keys="pred", dim=0),
        ]

    def _get_network(self, device: Any, data: Any) -> Any:
        return self.network.to(device).eval()


class MyApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        super().__init__(
            app_dir=app_dir, studies=studies, conf=conf, name="bench",
            description="labelgrid bench app", version="0.1", labels=LABELS,
        )  # fmt: skip

    def init_infers(self) -> dict[str, InferTask]:
        return {"segmentation": Segmentation()}

    def init_strategies(self) -> dict[str, Any]:
        return {"random": Random(), "first": First()}
