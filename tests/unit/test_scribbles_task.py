"""The scribbles task's steps on their own (MONAI Label's HistogramBasedGraphCut): scribble ids
from label_info, the ROI, and the graph cut keeping to the scribbled intensity class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apps.api.base import InferInput, Prompt
from apps.radiology.scribbles import HistogramGraphCut, apply_roi, scribble_ids


def test_scribble_ids_from_label_info() -> None:
    assert scribble_ids({}, 2, 3) == (2, 3)
    info = [
        {"name": "liver", "id": 1},
        {"name": "background_scribbles", "id": 5},
        {"name": "foreground_scribbles", "id": 6},
    ]
    assert scribble_ids({"label_info": info}, 2, 3) == (5, 6)
    assert scribble_ids({"label_info": [{"name": "foreground_scribbles", "idx": 9}]}, 2, 3) == (2, 9)
    for bad in (
        [{"name": "background_scribbles", "id": "x"}],
        [{"name": "foreground_scribbles", "id": 2}],
        "nope",
        [3],
    ):
        with pytest.raises(ValueError):
            scribble_ids({"label_info": bad}, 2, 3)


def test_roi_marks_outside_as_background_and_seeds_its_centre() -> None:
    scribbles = apply_roi(np.zeros((30, 30, 30), dtype=np.uint8), [10, 20, 10, 20, 10, 20], 2, 3)
    assert (scribbles[:10] == 2).all() and (scribbles[20:] == 2).all()
    assert (scribbles[15, 15, 15] == 3) and (scribbles == 3).sum() == 10**3
    kept = np.zeros((30, 30, 30), dtype=np.uint8)
    kept[12, 12, 12] = 3
    assert (apply_roi(kept, [10, 20, 10, 20, 10, 20], 2, 3) == 3).sum() == 1  # strokes given: no seed
    with pytest.raises(ValueError, match="no voxel"):
        apply_roi(kept, [40, 50, 0, 5, 0, 5], 2, 3)
    with pytest.raises(ValueError, match="roi must be"):
        apply_roi(kept, [1, 2, 3], 2, 3)


def test_graph_cut_grows_over_the_class_and_stays_in_it() -> None:
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), axis=-1)
    bright = np.linalg.norm(grid - 16, axis=-1) <= 8
    image = rng.normal(0.0, 0.1, (32,) * 3).astype(np.float32) + bright
    scribbles = np.zeros((32,) * 3, dtype=np.float32)
    scribbles[15:18, 16, 16] = 3
    scribbles[2:5, 2, 2] = 2
    task = HistogramGraphCut()
    task.validate_params({}, image.shape)
    item = InferInput(
        {
            "image": torch.from_numpy(image)[None],
            "label": torch.from_numpy(scribbles)[None],
            "affine": np.diag([2.0, 2.0, 2.0, 1.0]),
        },
        Prompt(),
        {},
    )
    for step in task.pre_transforms({}):
        item = step(item)
    result = task.inferer({})(item.data["image"][None], task.network()).numpy().astype(bool)
    assert result[bright].mean() > 0.95 and not result[~bright].any()
    with pytest.raises(ValueError, match="lamda"):
        task.validate_params({"lamda": "high"}, image.shape)
    with pytest.raises(ValueError, match="intensity_range"):
        task.validate_params({"intensity_range": [0, 1]}, image.shape)
