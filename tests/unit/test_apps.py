"""The sample app: tasks load, networks run on a small volume, transforms keep shape and affine."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.base import InferInput, InferTask, InferType
from apps.prompt import Prompt
from apps.transforms import ResampleToSpacing, keep_clicked_components
from services.common.apps import load_app
from services.common.errors import FailedPrecondition, InvalidArgument
from services.infer.adapters.torch_runner import TorchRunner
from services.infer.adapters.volumes import VolumeFiles
from services.infer.domain.model import Volume

AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.5, 0, 5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def app():
    return load_app("apps.radiology")


def test_app_loads_its_tasks(app) -> None:
    assert app.name == "radiology"
    assert app.labels == {"sphere_a": 1, "sphere_b": 2}
    assert set(app.infer_tasks) == {"segmentation", "deepgrow", "deepedit"}
    segmentation = app.infer_tasks["segmentation"]
    assert isinstance(segmentation, InferTask)
    assert segmentation.type is InferType.SEGMENTATION
    assert segmentation.labels == {"sphere_a": 1, "sphere_b": 2}
    assert app.infer_tasks["deepgrow"].type is InferType.DEEPGROW
    assert app.infer_tasks["deepgrow"].input_channels == 3
    info = segmentation.info()
    assert info["type"] == "segmentation" and info["dimension"] == 3 and "sw_batch_size" in info["config"]


def test_unknown_app_is_a_model_import_error() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        load_app("apps.no_such_app")
    assert caught.value.reason == "MODEL_IMPORT_ERROR"


@pytest.mark.parametrize("name", ["segmentation", "deepgrow", "deepedit"])
def test_networks_forward_and_are_seeded(app, name: str) -> None:
    task = app.infer_tasks[name]
    first, second = task.initial_network().eval(), task.initial_network().eval()
    x = torch.randn(1, task.input_channels, 32, 32, 32)
    with torch.inference_mode():
        out = first(x)
        again = second(x)
    channels = 1 if name == "deepgrow" else 3
    assert out.shape == (1, channels, 32, 32, 32)
    assert torch.equal(out, again), "two untrained networks of one task must be identical (seeded)"


def test_resample_moves_image_and_clicks() -> None:
    image = torch.zeros(1, 40, 36, 30)
    item = InferInput({"image": image, "affine": AFFINE}, Prompt(foreground=((39, 0, 15),)), {})
    out = ResampleToSpacing((3.0, 3.0, 3.0))(item)
    assert tuple(out.data["image"].shape) == (1, 20, 18, 20)
    assert out.prompt.foreground == ((19, 0, 10),)


def test_keep_clicked_components_grows_the_clicked_region_only() -> None:
    mask = np.zeros((10, 10, 10), dtype=np.int64)
    mask[1:4, 1:4, 1:4] = 1
    mask[6:9, 6:9, 6:9] = 1
    kept = keep_clicked_components(mask, [(2, 2, 2)])
    assert kept.sum() == 27 and kept[7, 7, 7] == 0
    assert keep_clicked_components(mask, [(5, 5, 5)]).sum() == 0


@pytest.mark.parametrize("name", ["segmentation", "deepgrow", "deepedit"])
def test_runner_returns_a_label_on_the_image_grid(app, name: str) -> None:
    task = app.infer_tasks[name]
    runner = TorchRunner(["cpu"], warm_up=False)
    loaded = runner.load(task, "cpu", None, "untrained")
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(size=(30, 26, 20)).astype(np.float32), AFFINE, "x.nii.gz")
    prompt = Prompt(label="sphere_a", foreground=((10, 10, 10),), label_points={"sphere_b": ((5, 5, 5),)})
    result = runner.run(task, loaded, volume, prompt, {}, threading.Event())
    assert result.label.shape == (30, 26, 20)
    assert set(np.unique(result.label)) <= ({0, 1} if name == "deepgrow" else {0, 1, 2})
    assert {"pre", "infer", "post"} <= set(result.latencies)


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd"])
def test_label_files_keep_the_affine(tmp_path: Path, extension: str) -> None:
    files = VolumeFiles()
    label = np.zeros((6, 5, 4), dtype=np.int64)
    label[1, 2, 3] = 2
    path = files.write_label(label, AFFINE, tmp_path, "lab", extension, "uint8", True)
    back = files.read(path, path.name)
    assert back.shape == (6, 5, 4)
    np.testing.assert_allclose(back.affine, AFFINE, atol=1e-6)
    assert back.data[1, 2, 3] == 2


def test_unreadable_volume_is_invalid_input(tmp_path: Path) -> None:
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(b"not a volume at all")
    with pytest.raises(InvalidArgument):
        VolumeFiles().read(path, path.name)
