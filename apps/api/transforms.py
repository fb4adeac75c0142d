"""Steps the sample tasks compose: resampling, intensity, click guidance, label making.

Each pre-step takes and returns an `InferInput`, so it can move the prompt along with
the image (a click given on the original grid must land on the resampled one).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from apps.api.base import InferInput
from apps.api.prompt import Point, Prompt


def voxel_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size (mm) along each axis: the column norms of the affine's rotation-zoom part."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def _scale_points(points: Iterable[Point], factors: Sequence[float], shape: Sequence[int]) -> tuple[Point, ...]:
    out = []
    for point in points:
        scaled = [min(max(round((p + 0.5) * f - 0.5), 0), s - 1) for p, f, s in zip(point, factors, shape, strict=True)]
        out.append((scaled[0], scaled[1], scaled[2]))
    return tuple(out)


class ResampleToSpacing:
    """Resamples the image (trilinear) to `spacing` mm and moves the prompt with it.

    Keeps the axes of the image (no reorientation), so the result maps back onto the
    original grid by a plain resize, as MONAI Label's `Restored` does.
    """

    def __init__(self, spacing: Sequence[float]):
        self.spacing = tuple(float(s) for s in spacing)

    def __call__(self, item: InferInput) -> InferInput:
        image: torch.Tensor = item.data["image"]
        shape = image.shape[1:]
        current = voxel_spacing(item.data["affine"])
        new_shape = [max(1, round(n * c / t)) for n, c, t in zip(shape, current, self.spacing, strict=True)]
        if list(new_shape) != list(shape):
            image = F.interpolate(image[None], size=new_shape, mode="trilinear", align_corners=False)[0]
        factors = [n / o for n, o in zip(new_shape, shape, strict=True)]
        prompt = item.prompt
        moved = Prompt(
            label=prompt.label,
            foreground=_scale_points(prompt.foreground, factors, new_shape),
            background=_scale_points(prompt.background, factors, new_shape),
            label_points={k: _scale_points(v, factors, new_shape) for k, v in prompt.label_points.items()},
        )
        item.data["image"] = image
        return InferInput(item.data, moved, item.params)


class NormalizeIntensity:
    """Zero mean, unit variance over the volume (robust to any scanner's range)."""

    def __call__(self, item: InferInput) -> InferInput:
        image: torch.Tensor = item.data["image"]
        std = float(image.std())
        item.data["image"] = (image - image.mean()) / (std if std > 1e-8 else 1.0)
        return item


def click_map(shape: Sequence[int], points: Iterable[Point], sigma: float) -> torch.Tensor:
    """A channel with a Gaussian blob (peak 1) at every click (MONAI's AddGuidanceSignal idea)."""
    signal = torch.zeros(tuple(shape), dtype=torch.float32)
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    for point in points:
        squared = sum(((grid - float(p)) ** 2 for grid, p in zip(grids, point, strict=True)), torch.zeros(()))
        signal = torch.maximum(signal, torch.exp(-squared / (2.0 * sigma * sigma)))
    return signal


class AddClickGuidance:
    """Appends one guidance channel per group of clicks (deepgrow: foreground, background)."""

    def __init__(self, groups: Sequence[str], sigma: float = 2.0):
        self.groups = list(groups)
        self.sigma = sigma

    def _points(self, prompt: Prompt, group: str) -> tuple[Point, ...]:
        if group == "foreground":
            return prompt.foreground
        if group == "background":
            return (*prompt.background, *prompt.label_points.get("background", ()))
        return prompt.label_points.get(group, ())

    def __call__(self, item: InferInput) -> InferInput:
        image: torch.Tensor = item.data["image"]
        channels = [click_map(image.shape[1:], self._points(item.prompt, group), self.sigma) for group in self.groups]
        item.data["image"] = torch.cat([image, torch.stack(channels).to(image.dtype)], dim=0)
        return item


def argmax_labels(logits: torch.Tensor) -> torch.Tensor:
    """(1, C, ...) logits -> (...) class indices."""
    return torch.argmax(logits[0], dim=0)


def sigmoid_threshold(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(1, 1, ...) logits -> (...) 0/1 mask."""
    return (torch.sigmoid(logits[0, 0]) > threshold).to(torch.int64)


def keep_clicked_components(mask: np.ndarray, clicks: Sequence[Point]) -> np.ndarray:
    """Keeps the connected regions that contain a foreground click: a click grows *its* region."""
    if not clicks:
        return mask
    allowed = torch.from_numpy(np.ascontiguousarray(mask > 0)).to(torch.float32)[None, None]
    grown = torch.zeros_like(allowed)
    for point in clicks:
        grown[(0, 0, *point)] = 1.0
    grown = grown * allowed
    # Geodesic dilation (26-connected) inside the mask until nothing changes: a flood fill.
    while True:
        step = F.max_pool3d(grown, kernel_size=3, stride=1, padding=1) * allowed
        if torch.equal(step, grown):
            break
        grown = step
    return grown[0, 0].numpy().astype(mask.dtype)
