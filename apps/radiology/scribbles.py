"""Scribbles: a label from foreground / background scribbles, no network (MONAI Label's
`HistogramBasedGraphCut`, the task 3D Slicer's scribbles panel talks to).

The input label (the multipart `label` part) holds the user's scribbles: label values
`foreground_scribbles` and `background_scribbles`, whose ids come from the request's
`label_info` (Slicer: `[{"name": ..., "id": ...}]`), else the next two values after the
app's labels (2 and 3 with none, as MONAI Label). Steps, as MONAI Label runs them:

1. `roi` ([i0, i1, j0, j1, k0, k1], end exclusive): everything outside is background
   scribble; with no foreground scribble, a small cube at the ROI's centre is one.
2. Image and scribbles resampled to `target_spacing` (trilinear / nearest); the intensity
   window `intensity_range` (a_min, a_max, b_min, b_max, clip) scales the image to [0, 1]
   (None: the 1st..99th percentile).
3. Likelihood from the scribbled voxels' intensity histograms (`num_bins`, a Dirichlet
   pseudo-count of 1 per bin, normalised to probabilities with a softmax as MONAI Label does).
4. ISeg unary (Wang et al. 2018, eq. 7): scribbled voxels are certain.
5. Graph cut (Boykov-Kolmogorov max-flow through PyMaxflow): unary -log(p), pairwise
   `lamda * exp(-d^2 / (2 sigma^2))` between 6-neighbours of intensity difference d; this is
   the energy numpymaxflow minimises, whose wheels need numpy < 2 (labelgrid runs numpy 2).
6. The foreground mask, back on the image's grid; value 1 is `selected_label_name`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import maxflow
import numpy as np
import torch
import torch.nn.functional as F

from apps.api.base import InferInput, InferTask, InferType, Prompt
from apps.api.transforms import voxel_spacing

FOREGROUND = "foreground_scribbles"
BACKGROUND = "background_scribbles"
ROI_SEED_HALF_SIZE = 5  # MONAI Label's offset around the ROI's centre
_EPS = float(np.finfo(np.float32).eps)


def _number(params: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = params.get(key, default)
    if isinstance(value, list) and value:  # a config choice sent back unchanged: its default
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
        raise ValueError(f"{key} must be a number between {low} and {high}, not {value!r}")
    return float(value)


def scribble_ids(params: Mapping[str, Any], default_bg: int, default_fg: int) -> tuple[int, int]:
    """(background, foreground) scribble values: from `label_info` where it names them."""
    background, foreground = default_bg, default_fg
    info = params.get("label_info") or []
    if not isinstance(info, list):
        raise ValueError("label_info must be a list of {name, id}")
    for entry in info:
        if not isinstance(entry, Mapping):
            raise ValueError("label_info must be a list of {name, id}")
        value = entry.get("id", entry.get("idx"))
        if entry.get("name") in (BACKGROUND, FOREGROUND):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or int(value) != value
                or not 0 < value < 2**16
            ):
                raise ValueError(f"label_info id of {entry.get('name')} must be a positive integer, not {value!r}")
            if entry["name"] == BACKGROUND:
                background = int(value)
            else:
                foreground = int(value)
    if background == foreground:
        raise ValueError("foreground and background scribbles must have different ids")
    return background, foreground


def apply_roi(scribbles: np.ndarray, roi: Sequence[int] | None, background: int, foreground: int) -> np.ndarray:
    """Outside the ROI is background; a ROI without foreground scribbles gets a seed at its centre."""
    if not roi:
        return scribbles
    if len(roi) != 6:
        raise ValueError("roi must be [i0, i1, j0, j1, k0, k1]")
    i0, i1, j0, j1, k0, k1 = (int(v) for v in roi)
    inside = np.zeros(scribbles.shape, dtype=bool)
    inside[max(i0, 0) : i1, max(j0, 0) : j1, max(k0, 0) : k1] = True
    if not inside.any():
        raise ValueError(f"roi {list(roi)} holds no voxel of the image")
    scribbles = scribbles.copy()
    scribbles[~inside] = background
    if not np.any(scribbles == foreground):
        centre = [(a + b) // 2 for a, b in ((i0, i1), (j0, j1), (k0, k1))]
        seed = tuple(slice(max(c - ROI_SEED_HALF_SIZE, 0), c + ROI_SEED_HALF_SIZE) for c in centre)
        scribbles[seed] = foreground
    return scribbles


def scale_intensity(image: np.ndarray, window: Sequence[float] | None) -> np.ndarray:
    """MONAI's ScaleIntensityRange (a_min, a_max, b_min, b_max, clip); None: percentiles 1..99 to [0, 1]."""
    if window is None:
        low, high = (float(v) for v in np.percentile(image, [1.0, 99.0]))
        a_min, a_max, b_min, b_max, clip = low, high, 0.0, 1.0, 1.0
    else:
        a_min, a_max, b_min, b_max, clip = window
    scaled: np.ndarray
    if a_max == a_min:
        scaled = np.full_like(image, b_min, dtype=np.float32)
    else:
        scaled = (image - a_min) / (a_max - a_min) * (b_max - b_min) + b_min
    if clip:
        scaled = np.clip(scaled, b_min, b_max)
    return scaled.astype(np.float32)


def histogram_likelihood(
    image: np.ndarray, scribbles: np.ndarray, background: int, foreground: int, bins: int
) -> np.ndarray:
    """(2, ...) background / foreground probabilities from the scribbled voxels' histograms."""
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:  # as MONAI Label: only an image outside [0, 1] is rescaled
        image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    edges = np.linspace(0.0, 1.0, bins + 1, dtype=np.float32)
    histograms = []
    for value in (background, foreground):
        counts, _ = np.histogram(image[scribbles == value], bins=bins, range=(0.0, 1.0))
        counts = counts.astype(np.float64) + 1.0  # Dirichlet prior: works with one kind of scribble only
        histograms.append((counts / counts.sum()).astype(np.float32))
    index = np.clip(np.digitize(image, edges[:-1]) - 1, 0, bins - 1)
    probabilities = np.stack([histograms[0][index], histograms[1][index]])
    if not np.allclose(probabilities.sum(axis=0), 1.0):  # MONAI Label's _normalise_logits: softmax
        shifted = np.exp(probabilities - probabilities.max(axis=0, keepdims=True))
        probabilities = shifted / shifted.sum(axis=0, keepdims=True)
    return probabilities.astype(np.float32)


def iseg_unary(probabilities: np.ndarray, scribbles: np.ndarray, background: int, foreground: int) -> np.ndarray:
    """Wang et al. 2018, eq. 7: a scribbled voxel is certainly of its class."""
    unary = probabilities.copy()
    for channel, value in enumerate((background, foreground)):
        marked = scribbles == value
        unary[channel][marked] = 1.0 - _EPS
        unary[1 - channel][marked] = _EPS
    return unary


def graph_cut(image: np.ndarray, unary: np.ndarray, lamda: float, sigma: float) -> np.ndarray:
    """The minimum cut of -log(p) unaries and intensity-weighted 6-neighbour smoothness; 1 = foreground."""
    graph = maxflow.Graph[float]()
    nodes = graph.add_grid_nodes(image.shape)
    for axis in range(image.ndim):
        difference = np.zeros(image.shape, dtype=np.float64)
        ahead = [slice(None)] * image.ndim
        ahead[axis] = slice(0, -1)
        behind = [slice(None)] * image.ndim
        behind[axis] = slice(1, None)
        difference[tuple(ahead)] = image[tuple(behind)].astype(np.float64) - image[tuple(ahead)]
        weights = lamda * np.exp(-(difference**2) / (2.0 * sigma**2))
        structure = np.zeros((3,) * image.ndim)
        structure[tuple(2 if a == axis else 1 for a in range(image.ndim))] = 1
        graph.add_grid_edges(nodes, weights=weights, structure=structure, symmetric=True)
    background = -np.log(np.maximum(unary[0], _EPS)).astype(np.float64)
    foreground = -np.log(np.maximum(unary[1], _EPS)).astype(np.float64)
    # Source side = foreground: a voxel left there pays its sink capacity, -log p(foreground).
    graph.add_grid_tedges(nodes, background, foreground)
    graph.maxflow()
    return (~graph.get_grid_segments(nodes)).astype(np.uint8)


class PrepareScribbles:
    """ROI, resampling and intensity window; the image and the scribbles end as two channels."""

    def __init__(self, task: HistogramGraphCut, params: Mapping[str, Any]) -> None:
        self.task, self.params = task, params

    def __call__(self, item: InferInput) -> InferInput:
        background, foreground = self.task.scribble_ids(self.params)
        image: torch.Tensor = item.data["image"]
        scribbles = item.data["label"][0].numpy().astype(np.int32)
        scribbles = torch.from_numpy(apply_roi(scribbles, self.params.get("roi"), background, foreground))[None].float()
        if self.task.target_spacing is not None:
            current = voxel_spacing(item.data["affine"])
            shape = image.shape[1:]
            new_shape = [
                max(1, round(n * c / t)) for n, c, t in zip(shape, current, self.task.target_spacing, strict=True)
            ]
            if list(new_shape) != list(shape):
                image = F.interpolate(image[None], size=new_shape, mode="trilinear", align_corners=False)[0]
                scribbles = F.interpolate(scribbles[None], size=new_shape, mode="nearest")[0]
        scaled = scale_intensity(image[0].numpy(), self.task.window(self.params))
        item.data["image"] = torch.stack([torch.from_numpy(scaled), scribbles[0]])
        return item


class GraphCutInferer:
    """In place of a network's inferer: likelihood, unary and graph cut on (1, 2, ...) inputs."""

    def __init__(self, task: HistogramGraphCut, params: Mapping[str, Any]) -> None:
        self.task, self.params = task, params

    def __call__(self, inputs: torch.Tensor, network: Any) -> torch.Tensor:
        background, foreground = self.task.scribble_ids(self.params)
        image = inputs[0, 0].cpu().numpy()
        scribbles = np.rint(inputs[0, 1].cpu().numpy()).astype(np.int32)
        bins = int(_number(self.params, "num_bins", self.task.config["num_bins"], 2, 4096))
        lamda = _number(self.params, "lamda", self.task.config["lamda"], 0.0, 1e6)
        sigma = _number(self.params, "sigma", self.task.config["sigma"], 1e-6, 1e6)
        probabilities = histogram_likelihood(image, scribbles, background, foreground, bins)
        unary = iseg_unary(probabilities, scribbles, background, foreground)
        return torch.from_numpy(graph_cut(image, unary, lamda, sigma))


class HistogramGraphCut(InferTask):
    """MONAI Label's HistogramBasedGraphCut on labelgrid's task template (no weights to load)."""

    type = InferType.SCRIBBLES
    dimension = 3
    labels: Mapping[str, int] = {}
    description = "Histogram likelihood and graph cut from foreground / background scribbles"
    input_channels = 2
    roi_size = (8, 8, 8)  # only the size of the (trivial) warm-up pass
    target_spacing: tuple[float, ...] | None = (2.0, 2.0, 2.0)
    intensity_range: tuple[float, float, float, float, bool] | None = None
    needs_input_label = True

    def __init__(self, lamda: float = 1.0, sigma: float = 0.1, num_bins: int = 64) -> None:
        super().__init__()
        self.config = {"lamda": lamda, "sigma": sigma, "num_bins": num_bins}

    def network(self) -> torch.nn.Module:
        return torch.nn.Identity()  # nothing to learn; the graph cut is the inferer

    def scribble_ids(self, params: Mapping[str, Any]) -> tuple[int, int]:
        count = len(self.labels)
        return scribble_ids(params, count + 1 if count else 2, count + 2 if count else 3)

    def window(self, params: Mapping[str, Any]) -> Sequence[float] | None:
        value = params.get("intensity_range", self.intensity_range)
        if value is None:
            return None
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 5
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value[:4])
        ):
            raise ValueError("intensity_range must be [a_min, a_max, b_min, b_max, clip]")
        return [float(v) for v in value[:4]] + [bool(value[4])]

    def validate_params(self, params: Mapping[str, Any], shape: Sequence[int]) -> None:
        """Raises ValueError (the service's INVALID_ARGUMENT) for params the task cannot use."""
        background, foreground = self.scribble_ids(params)
        apply_roi(np.zeros(tuple(shape), dtype=np.uint8), params.get("roi"), background, foreground)
        self.window(params)
        _number(params, "num_bins", self.config["num_bins"], 2, 4096)
        _number(params, "lamda", self.config["lamda"], 0.0, 1e6)
        _number(params, "sigma", self.config["sigma"], 1e-6, 1e6)

    def pre_transforms(self, params: Mapping[str, Any]) -> Sequence[Callable[[InferInput], InferInput]]:
        return [PrepareScribbles(self, params)]

    def inferer(self, params: Mapping[str, Any]) -> Any:
        return GraphCutInferer(self, params)

    def label_names(self, prompt: Prompt) -> dict[str, int]:
        return {prompt.label or "foreground": 1}

    def tensors(self) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
        return [("image", "FP32", [-1, 2, -1, -1, -1])], [("pred", "UINT8", [-1, 1, -1, -1, -1])]
