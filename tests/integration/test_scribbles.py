"""Scribbles (Slicer's scribbles panel) and raw `label.bin` labels (OHIF v2), end to end:
the official MONAI Label client and plain HTTP against the real gateway, datastore and
inference service (sample app, CPU). Also /logs/gpu, which asks the inference service."""

from __future__ import annotations

import json

import httpx
import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient

from tests.fixtures.gateway import GatewayStack

pytestmark = pytest.mark.timeout(300)

SIZE = 40
AFFINE = np.array([[2.0, 0, 0, -40.0], [0, 2.0, 0, -30.0], [0, 0, 2.0, 10.0], [0, 0, 0, 1.0]])
BACKGROUND, FOREGROUND = 4, 7  # ids Slicer's label_info gives the two scribble segments
LABEL_INFO = [
    {"name": "spleen", "id": 1},
    {"name": "background_scribbles", "id": BACKGROUND},
    {"name": "foreground_scribbles", "id": FOREGROUND},
]


def synthetic() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy volume with two bright spheres (one intensity class) on a dark background,
    the bright mask, and scribbles: a short foreground stroke inside the big sphere, a
    background stroke in the dark."""
    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"), axis=-1)
    bright = np.linalg.norm(grid - np.array([20, 18, 21]), axis=-1) <= 9
    bright |= np.linalg.norm(grid - np.array([6, 32, 6]), axis=-1) <= 4
    image = rng.normal(100.0, 8.0, (SIZE,) * 3).astype(np.float32)
    image[bright] += 120.0
    scribbles = np.zeros((SIZE,) * 3, dtype=np.uint8)
    scribbles[18:23, 18, 21] = FOREGROUND
    scribbles[30:37, 5, 30] = BACKGROUND
    assert bright[scribbles == FOREGROUND].all() and not bright[scribbles == BACKGROUND].any()
    return image, bright, scribbles


@pytest.fixture(scope="module")
def volume(inference_stack: GatewayStack, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("scribbles")
    image, bright, scribbles = synthetic()
    image_path = folder / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, AFFINE), str(image_path))
    scribbles_path = folder / "scribbles.nii.gz"
    nib.save(nib.Nifti1Image(scribbles, AFFINE), str(scribbles_path))
    client = MONAILabelClient(inference_stack.url, tmpdir=str(folder), client_id="slicer")
    assert client.upload_image(str(image_path), "scribbled") == {"image": "scribbled"}
    return {
        "client": client,
        "bright": bright,
        "scribbles": scribbles,
        "scribbles_path": scribbles_path,
        "folder": folder,
    }


def check_result(result: np.ndarray, bright: np.ndarray, scribbles: np.ndarray) -> None:
    foreground = result == 1
    stroke = scribbles == FOREGROUND
    assert foreground[stroke].all()  # the scribbled voxels are in
    assert foreground.sum() > 20 * stroke.sum()  # and the region grew from them ...
    assert foreground[bright].mean() > 0.9  # ... over the bright class ...
    assert not foreground[~bright].any()  # ... and stayed inside it
    assert not foreground[scribbles == BACKGROUND].any()


def test_scribbles_through_the_official_client(volume: dict) -> None:
    client: MONAILabelClient = volume["client"]
    # As Slicer sends them: the label map's segments, the selected one, the model's config.
    params = {"label_info": LABEL_INFO, "selected_label_name": "spleen", "lamda": 1.0, "sigma": 0.1, "num_bins": 64}
    result_file, result_params = client.infer("scribbles", "scribbled", params, label_in=str(volume["scribbles_path"]))
    assert result_params["label_names"] == {"spleen": 1}
    result = nib.load(result_file)
    assert np.allclose(result.affine, AFFINE)
    check_result(np.asarray(result.dataobj), volume["bright"], volume["scribbles"])


def test_scribbles_roi_bounds_the_result(volume: dict, inference_stack: GatewayStack) -> None:
    """Slicer's roi: outside it is background; with no foreground stroke its centre is one."""
    bright, folder = volume["bright"], volume["folder"]
    empty = np.zeros((SIZE,) * 3, dtype=np.uint8)
    path = folder / "no_strokes.nii.gz"
    nib.save(nib.Nifti1Image(empty, AFFINE), str(path))
    roi = [12, 29, 10, 27, 13, 30]  # around the big sphere only
    client: MONAILabelClient = volume["client"]
    result_file, _ = client.infer("scribbles", "scribbled", {"label_info": LABEL_INFO, "roi": roi}, label_in=str(path))
    foreground = np.asarray(nib.load(result_file).dataobj) == 1
    inside = np.zeros_like(foreground)
    inside[12:29, 10:27, 13:30] = True
    assert foreground.sum() > 500 and not foreground[~inside].any()
    assert not foreground[~bright].any()


def test_scribbles_as_raw_label_bin(volume: dict, inference_stack: GatewayStack) -> None:
    """OHIF v2 sends the scribbles as label.bin: uint8 voxels, first axis fastest."""
    raw = volume["scribbles"].tobytes(order="F")
    answer = httpx.post(
        f"{inference_stack.url}/infer/scribbles",
        params={"image": "scribbled", "output": "image"},
        data={"params": json.dumps({"label_info": LABEL_INFO})},
        files={"label": ("label.bin", raw, "application/octet-stream")},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    path = volume["folder"] / "from_bin.nii.gz"
    path.write_bytes(answer.content)
    check_result(np.asarray(nib.load(str(path)).dataobj), volume["bright"], volume["scribbles"])


def test_bad_scribbles_are_422(volume: dict, inference_stack: GatewayStack) -> None:
    url = f"{inference_stack.url}/infer/scribbles"
    short = httpx.post(
        url,
        params={"image": "scribbled"},
        files={"label": ("label.bin", b"\0" * 1000, "application/octet-stream")},
        timeout=60,
    )
    assert short.status_code == 422
    assert "label.bin has 1000 bytes" in short.json()["detail"] and f"{SIZE}x{SIZE}x{SIZE}" in short.json()["detail"]
    none = httpx.post(url, params={"image": "scribbled"}, data={"params": "{}"}, timeout=60)
    assert none.status_code == 422 and "input label" in none.json()["detail"]
    wrong_grid = volume["folder"] / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.uint8), AFFINE), str(wrong_grid))
    mismatch = httpx.post(
        url, params={"image": "scribbled"}, files={"label": ("small.nii.gz", wrong_grid.read_bytes())}, timeout=60
    )
    assert mismatch.status_code == 422 and "must match" in mismatch.json()["detail"]
    outside = httpx.post(
        url,
        params={"image": "scribbled"},
        data={"params": json.dumps({"roi": [100, 120, 0, 5, 0, 5]})},
        files={"label": ("label.bin", volume["scribbles"].tobytes(order="F"))},
        timeout=60,
    )
    assert outside.status_code == 422 and "roi" in outside.json()["detail"]
    bad_ext = httpx.post(url, params={"image": "scribbled"}, files={"label": ("label.txt", b"x" * 10)}, timeout=60)
    assert bad_ext.status_code == 422, bad_ext.text


def test_save_label_bin_becomes_a_label_volume(volume: dict, inference_stack: GatewayStack) -> None:
    """PUT /datastore/label with OHIF v2's label.bin: stored as a NIfTI on the image's grid."""
    url = inference_stack.url
    labels = np.zeros((SIZE,) * 3, dtype=np.uint8)
    labels[volume["bright"]] = 1
    labels[0:3, 0:5, 0:7] = 2
    saved = httpx.put(
        f"{url}/datastore/label",
        params={"image": "scribbled", "tag": "ohif"},
        data={"params": json.dumps({"label_info": [{"name": "spleen", "idx": 1}]})},
        files={"label": ("label.bin", labels.tobytes(order="F"), "application/octet-stream")},
    )
    assert saved.status_code == 200, saved.text
    download = httpx.get(f"{url}/datastore/label", params={"label": "scribbled", "tag": "ohif"})
    assert download.status_code == 200
    assert download.headers["content-disposition"].endswith('.nii.gz"')
    path = volume["folder"] / "stored.nii.gz"
    path.write_bytes(download.content)
    stored = nib.load(str(path))
    assert np.allclose(stored.affine, AFFINE)
    assert np.array_equal(np.asarray(stored.dataobj), labels)

    wrong = httpx.put(
        f"{url}/datastore/label",
        params={"image": "scribbled", "tag": "ohif_bad"},
        files={"label": ("label.bin", b"\1" * (SIZE**3 - 1), "application/octet-stream")},
    )
    assert wrong.status_code == 422 and "label.bin" in wrong.json()["detail"]
    assert httpx.head(f"{url}/datastore/label", params={"image": "scribbled", "tag": "ohif_bad"}).status_code == 404
    missing = httpx.put(
        f"{url}/datastore/label",
        params={"image": "no_such_image", "tag": "ohif"},
        files={"label": ("label.bin", b"\1" * 64, "application/octet-stream")},
    )
    assert missing.status_code == 404


def test_gpu_info_from_the_inference_service(inference_stack: GatewayStack) -> None:
    answer = httpx.get(f"{inference_stack.url}/logs/gpu")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    assert "cpu" in answer.text.lower()
