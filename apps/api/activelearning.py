"""Base classes of an app's active learning parts: strategies and scoring methods.

MONAI Label's `Strategy` and `ScoringMethod` are callables that get the whole datastore;
here they only *declare* what they need, and the active learning service does the I/O:

- a `Strategy` names the order in which free images are handed out (by id, at random, or
  by a stored score), so the datastore can pick and lease the next image in one indexed,
  atomic step — several annotators at once never get the same image;
- a `ScoringMethod` computes one number per image from a model's network and the image's
  volume (blocking torch work, run on the service's scoring device), and the service stores
  it in the datastore as the image's score and info (MONAI Label's update_image_info).

Plain Python and torch, no gRPC: the same classes run in any service or test.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from apps.api.base import InferInput, InferTask, Prompt


class Order(str, enum.Enum):
    """How a strategy orders the free, unlabeled images."""

    FIRST = "first"  # by image id, plain string order (MONAI Label's First)
    RANDOM = "random"  # at random (MONAI Label's Random)
    SCORE = "score"  # highest stored score first (MONAI Label's Epistemic and friends)


class Strategy:
    """Picks the next image to label: an order over the unlabeled images, nothing more."""

    order: Order = Order.FIRST
    # Score key for Order.SCORE (the key a scoring method writes, e.g. "epistemic_entropy").
    score_key: str = ""
    # Tag whose labels make an image "labeled" (and thus not a candidate).
    label_tag: str = "final"
    description: str = ""

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}

    def info(self) -> dict[str, Any]:
        return {"description": self.description}


class First(Strategy):
    order = Order.FIRST
    description = "Get First Sample"


class Random(Strategy):
    order = Order.RANDOM
    description = "Random Strategy"


class ScoreStrategy(Strategy):
    """The free image with the highest stored `score_key` (images never scored come last, by id)."""

    order = Order.SCORE

    def __init__(self, score_key: str, description: str = "") -> None:
        super().__init__()
        self.score_key = score_key
        self.description = description or f"Highest {score_key} first"


class ImageSet(str, enum.Enum):
    """Which images a scoring method scores."""

    UNLABELED = "unlabeled"
    LABELED = "labeled"


@dataclass
class ScoringInput:
    """What a scoring method gets for one image: the volume on its grid, and, for label-based
    methods, the image's final label on the same grid."""

    image: np.ndarray  # (x, y, z) float32
    affine: np.ndarray  # 4x4 RAS voxel-to-world
    label: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)


class ScoringMethod:
    """Scores images with a model: higher means "label this sooner" for score strategies.

    Subclasses implement `score` (blocking; the service runs it on the scoring device).
    """

    description: str = ""
    # The infer task (model) whose served weights score; the service loads them.
    model: str = ""
    # The score key written to the datastore (and into the image info).
    score_key: str = ""
    images: ImageSet = ImageSet.UNLABELED

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}

    def info(self) -> dict[str, Any]:
        return {"description": self.description}

    def score(self, task: InferTask, network: torch.nn.Module, device: str, item: ScoringInput) -> float:
        raise NotImplementedError


# -- helpers the sample methods share ------------------------------------------------------


def prepare(task: InferTask, item: ScoringInput, device: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """The task's pre-transforms on the volume: a (1, C, ...) tensor on `device`, and the params."""
    params = {**task.config, **item.params}
    data = InferInput(
        {"image": torch.from_numpy(np.ascontiguousarray(item.image, dtype=np.float32))[None], "affine": item.affine},
        Prompt(),
        dict(params),
    )
    for step in task.pre_transforms(params):
        data = step(data)
    image = data.data["image"]
    if image.shape[0] != task.input_channels:
        # Interactive models take guidance channels: score them with empty guidance.
        extra = torch.zeros((task.input_channels - image.shape[0], *image.shape[1:]), dtype=image.dtype)
        image = torch.cat([image, extra], dim=0)
    return image[None].to(torch.device(device)), params


def probabilities(
    task: InferTask, network: torch.nn.Module, inputs: torch.Tensor, params: dict[str, Any]
) -> torch.Tensor:
    """Softmax (or sigmoid for one channel) of the network's logits over the task's inferer."""
    logits = task.inferer(params)(inputs, network)
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


# MC dropout draws its masks from a generator of its own, never from torch's global one:
# scoring runs on worker threads beside other torch work in the same process, and a shared
# global generator would make both sides' random numbers depend on thread timing.
_mc_sampler: ContextVar[_DropoutSampler | None] = ContextVar("mc_dropout_sampler", default=None)
_install_lock = threading.Lock()
_HOOKED = "_labelgrid_mc_dropout_hooked"


class _DropoutSampler:
    """Dropout masks at rate `p` from private generators seeded with `seed` (one per device)."""

    def __init__(self, p: float, seed: int) -> None:
        self.p = p
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def drop(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        generator = self._generators.get(output.device)
        if generator is None:
            generator = self._generators[output.device] = torch.Generator(device=output.device)
            generator.manual_seed(self.seed)
        channelwise = isinstance(
            module, torch.nn.Dropout1d | torch.nn.Dropout2d | torch.nn.Dropout3d | torch.nn.FeatureAlphaDropout
        )
        # Channel dropout zeroes whole feature maps (N, C, 1, ...); plain dropout single elements.
        shape = (*output.shape[:2], *(1,) * (output.dim() - 2)) if channelwise and output.dim() > 2 else output.shape
        keep = torch.empty(shape, device=output.device, dtype=output.dtype).bernoulli_(
            1.0 - self.p, generator=generator
        )
        return output * keep / (1.0 - self.p)


def _dropout_hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
    """Permanent hook on every dropout layer: a no-op unless this thread is inside `mc_dropout`."""
    sampler = _mc_sampler.get()
    return None if sampler is None else sampler.drop(module, output)


@contextmanager
def mc_dropout(network: torch.nn.Module, p: float, seed: int = 0) -> Iterator[torch.nn.Module]:
    """The network in eval mode with its dropout layers sampling at rate `p` (MC dropout).

    Only the calling thread (context) sees dropout: other threads running the same network
    meanwhile get plain inference. No weight, rate, mode or state_dict key changes (MONAI's
    UNet always holds its Dropout layers at p=0); masks come from a private generator seeded
    with `seed`, so the same inputs give the same samples whatever else runs.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout must be between 0 and 1 (got {p})")
    layers = [m for m in network.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    if not layers:
        raise ValueError(f"{type(network).__name__} has no dropout layers: MC dropout cannot sample it")
    with _install_lock:
        for layer in layers:
            if not getattr(layer, _HOOKED, False):
                layer.register_forward_hook(_dropout_hook)
                setattr(layer, _HOOKED, True)
    was_training = network.training
    network.eval()
    token = _mc_sampler.set(_DropoutSampler(p, seed))
    try:
        yield network
    finally:
        _mc_sampler.reset(token)
        network.train(was_training)


def dice(prediction: np.ndarray, label: np.ndarray, classes: list[int]) -> float:
    """Mean Dice over `classes` (a class absent from both counts as 1)."""
    scores = []
    for value in classes:
        a, b = prediction == value, label == value
        total = int(a.sum()) + int(b.sum())
        scores.append(1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total)
    return float(np.mean(scores)) if scores else 1.0
