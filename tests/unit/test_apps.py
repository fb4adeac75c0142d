"""The sample app: tasks load, networks run on a small volume, transforms keep shape and affine."""

from __future__ import annotations

import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from apps.api.base import InferInput, InferTask, InferType
from apps.api.prompt import Prompt
from apps.api.transforms import ResampleToSpacing, keep_clicked_components
from apps.radiology.segmentation_brain import SegmentationBrain
from services.common.apps import load_app
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.models.torch_runner import TorchRunner
from services.common.models.types import Volume
from services.common.models.volumes import VolumeFiles
from services.datastore.sample_studies import write_sample_studies

AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.5, 0, 5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def app():
    return load_app("apps.radiology")


def test_app_loads_its_tasks(app) -> None:
    assert app.name == "radiology"
    # No app-level LABELS: MONAI Label's union of the models' labels, model by model, as a list.
    assert app.labels == {"sphere_a": 1, "sphere_b": 2, "brain": 3} and app.labels_as_list
    assert set(app.infer_tasks) == {"segmentation", "deepgrow", "deepedit", "segmentation_brain", "scribbles"}
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


# -- segmentation_brain and its sample study: the MNI152 T1 that nilearn ships ---------

MNI_SHAPE = (99, 117, 95)
MNI_AFFINE = np.array([[2.0, 0, 0, -98.0], [0, 2.0, 0, -134.0], [0, 0, 2.0, -72.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def brain_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    assert write_sample_studies(root, count=1, labeled=0, size=16, brain=True) == ["sample_00", "mni152_t1"]
    return root


def test_sample_studies_write_the_mni152_t1_with_its_brain_mask(brain_studies: Path) -> None:
    image = nib.load(brain_studies / "mni152_t1.nii.gz")
    label = nib.load(brain_studies / "labels" / "final" / "mni152_t1.nii.gz")
    assert image.shape == label.shape == MNI_SHAPE
    np.testing.assert_allclose(image.affine, MNI_AFFINE, atol=1e-6)
    np.testing.assert_allclose(label.affine, MNI_AFFINE, atol=1e-6)
    mask = np.asarray(label.dataobj)
    assert label.get_data_dtype() == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert 0.1 < mask.mean() < 0.5, "the brain is a good part of the head's box, not all of it"
    data = image.get_fdata(dtype=np.float32)
    assert data[mask == 1].mean() > 5 * data[mask == 0].mean(), "the mask must cover the (skull-stripped) brain"
    assert sorted(p.name for p in brain_studies.glob("*.nii.gz")) == ["mni152_t1.nii.gz", "sample_00.nii.gz"]
    assert write_sample_studies(brain_studies, count=1, labeled=0, size=16, brain=True) == [], "a filled folder stays"


def test_sample_studies_without_brain_write_only_the_spheres(tmp_path: Path) -> None:
    assert write_sample_studies(tmp_path, count=2, labeled=1, size=16) == ["sample_00", "sample_01"]
    assert not (tmp_path / "mni152_t1.nii.gz").exists()


def test_segmentation_brain_loads_and_is_seeded(app) -> None:
    task = app.infer_tasks["segmentation_brain"]
    assert isinstance(task, SegmentationBrain) and task.type is InferType.SEGMENTATION
    assert task.labels == {"brain": 1} and task.target_spacing == (2.0, 2.0, 2.0)
    assert task.info()["type"] == "segmentation" and task.info()["labels"] == {"brain": 1}
    first, second = task.initial_network().eval(), task.initial_network().eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.inference_mode():
        out, again = first(x), second(x)
    assert out.shape == (1, 2, 32, 32, 32)
    assert torch.equal(out, again)


def test_segmentation_brain_runs_on_a_crop_of_the_mni152_t1(app, brain_studies: Path) -> None:
    task = app.infer_tasks["segmentation_brain"]
    image = nib.load(brain_studies / "mni152_t1.nii.gz")
    start = np.array([30, 40, 30])
    crop = image.get_fdata(dtype=np.float32)[30:70, 40:80, 30:70]
    affine = image.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ start
    # The intensity step maps the T1's percentiles onto [0, 1].
    item = InferInput({"image": torch.from_numpy(crop.copy())[None], "affine": affine}, Prompt(), {})
    for step in task.pre_transforms({}):
        item = step(item)
    assert tuple(item.data["image"].shape) == (1, 40, 40, 40)
    assert float(item.data["image"].min()) == 0.0 and float(item.data["image"].max()) == 1.0
    runner = TorchRunner(["cpu"], warm_up=False)
    loaded = runner.load(task, "cpu", None, "untrained")
    result = runner.run(task, loaded, Volume(crop, affine, "mni152_crop.nii.gz"), Prompt(), {}, threading.Event())
    assert result.label.shape == (40, 40, 40)
    assert set(np.unique(result.label)) <= {0, 1}
