"""The radiology app's strategies and scoring methods (MONAI Label's radiology app has the same).

- strategies: `random`, `first`, and score-based `epistemic` and `tta` (highest stored
  score among the free unlabeled images);
- scoring: `epistemic` (MC dropout: N stochastic passes, mean voxel variance of the class
  probabilities), `tta` (test-time augmentation: flips, same variance), `dice` (Dice between
  the model's output and the saved final label: low Dice = the model still gets it wrong).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from apps.api.activelearning import (
    First,
    ImageSet,
    Random,
    ScoreStrategy,
    ScoringInput,
    ScoringMethod,
    Strategy,
    dice,
    mc_dropout,
    prepare,
    probabilities,
)
from apps.api.base import InferTask

EPISTEMIC_KEY = "epistemic_entropy"  # MONAI Label's key, so its users' Epistemic strategy reads it
TTA_KEY = "tta_variance"
DICE_KEY = "dice"


def _int(params: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = int(params.get(key, default))
    if not low <= value <= high:
        raise ValueError(f"{key} must be between {low} and {high} (got {value})")
    return value


class EpistemicScoring(ScoringMethod):
    """MC dropout: N forward passes with dropout on; score = mean voxel variance of the softmax."""

    score_key = EPISTEMIC_KEY
    images = ImageSet.UNLABELED

    def __init__(self, model: str = "segmentation", passes: int = 8, dropout: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.description = f"Compute initial score based on dropout - {model} (MC dropout, {passes} passes)"
        self.config = {"passes": passes, "dropout": dropout}
        self.seed = seed

    def score(self, task: InferTask, network: torch.nn.Module, device: str, item: ScoringInput) -> float:
        params = {**self.config, **item.params}
        passes = _int(params, "passes", 8, 2, 64)
        rate = float(params.get("dropout", 0.2))
        if not 0.0 < rate < 1.0:
            raise ValueError(f"dropout must be between 0 and 1 (got {rate})")
        inputs, infer_params = prepare(task, item, device)
        # Seeded (a private generator), so the same image and weights give the same score on any run.
        with torch.inference_mode(), mc_dropout(network, rate, self.seed):
            samples = torch.stack([probabilities(task, network, inputs, infer_params) for _ in range(passes)])
        return float(samples.var(dim=0, unbiased=True).mean().item())


class TTAScoring(ScoringMethod):
    """Test-time augmentation: the network on flipped copies; score = mean voxel variance."""

    score_key = TTA_KEY
    images = ImageSet.UNLABELED

    def __init__(self, model: str = "segmentation") -> None:
        super().__init__()
        self.model = model
        self.description = f"Compute score based on test-time augmentation (flips) - {model}"
        self.config = {"flips": 4}

    def score(self, task: InferTask, network: torch.nn.Module, device: str, item: ScoringInput) -> float:
        params = {**self.config, **item.params}
        flips = _int(params, "flips", 4, 2, 8)
        inputs, infer_params = prepare(task, item, device)
        spatial = list(range(2, inputs.ndim))
        axes_sets: list[list[int]] = [[]] + [[axis] for axis in spatial] + [spatial[:2], spatial[1:], spatial]
        samples = []
        with torch.inference_mode():
            for axes in axes_sets[:flips]:
                flipped = torch.flip(inputs, axes) if axes else inputs
                probs = probabilities(task, network, flipped, infer_params)
                samples.append(torch.flip(probs, axes) if axes else probs)
        return float(torch.stack(samples).var(dim=0, unbiased=True).mean().item())


class DiceScoring(ScoringMethod):
    """Dice between the model's prediction and the saved final label (labeled images only)."""

    score_key = DICE_KEY
    images = ImageSet.LABELED

    def __init__(self, model: str = "segmentation") -> None:
        super().__init__()
        self.model = model
        self.description = "Compute Dice for predicated label vs submitted"

    def score(self, task: InferTask, network: torch.nn.Module, device: str, item: ScoringInput) -> float:
        if item.label is None:
            raise ValueError("dice needs the image's final label")
        inputs, infer_params = prepare(task, item, device)
        with torch.inference_mode():
            logits = task.inferer(infer_params)(inputs, network)
        prediction = logits.detach()
        for step in task.post_transforms(infer_params):
            prediction = step(prediction)
        label = np.asarray(item.label)
        if tuple(prediction.shape) != label.shape:
            prediction = F.interpolate(prediction[None, None].float(), size=label.shape, mode="nearest")[0, 0]
        predicted = prediction.to(torch.int64).cpu().numpy()
        classes = sorted(int(v) for v in task.labels.values()) or [1]
        return dice(predicted, label.astype(np.int64), classes)


def strategies() -> dict[str, Strategy]:
    return {
        "random": Random(),
        "first": First(),
        "epistemic": ScoreStrategy(EPISTEMIC_KEY, "Highest epistemic (MC dropout) uncertainty first"),
        "tta": ScoreStrategy(TTA_KEY, "Highest test-time augmentation variance first"),
    }


def scoring_methods() -> dict[str, ScoringMethod]:
    return {
        "epistemic": EpistemicScoring("segmentation"),
        "tta": TTAScoring("segmentation"),
        "dice": DiceScoring("segmentation"),
    }
