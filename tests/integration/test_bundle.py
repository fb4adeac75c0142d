"""MONAI Bundles as models, through the REST API of a real `labelgrid up --bundle ...`.

Bundles are made here with MONAI's own API and seeded weights (tests/fixtures/bundles.py):
a 3D CT segmentation bundle (Orientationd, Spacingd, ScaleIntensityRanged window,
SlidingWindowInferer, Invertd) with a train config, the same network as a TorchScript
bundle given as a zip, and a DeepEdit-style interactive bundle (clicks per label name). The label labelgrid answers must equal, voxel for voxel, what MONAI's
own `monai.bundle.run` of the same bundle writes for the same image. Auth is on: only an admin
may add a bundle (it is code), and the services store and load bundles as themselves.
"""

from __future__ import annotations

import gzip
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import nibabel as nib
import numpy as np
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc

from services.common.auth import ADMIN, ANNOTATOR, UsersFile
from tests.fixtures.bundles import ct_image, make_bundle, make_deepedit_bundle, zip_folder
from tests.fixtures.labelgrid_up import Stack, start_stack, stop_stack
from tests.fixtures.polling import wait_until

IMAGE = "ct001"


def bundle_run(bundle: Path, image: Path, out: Path) -> np.ndarray:
    """What `monai.bundle.run` of the bundle's inference config writes for `image`."""
    from monai.bundle import run

    data = out / "data"
    data.mkdir(parents=True)
    shutil.copy(image, data / image.name)
    run(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        bundle_root=str(bundle),
        dataset_dir=str(data),
        output_dir=str(out / "eval"),
    )
    written = sorted((out / "eval").rglob("*.nii.gz"))
    assert len(written) == 1, written
    return np.asarray(nib.load(str(written[0])).dataobj)


def deepedit_run(bundle: Path, image: Path, out: Path, clicks: dict[str, Any]) -> np.ndarray:
    """What `monai.bundle.run` of a DeepEdit bundle writes for `image` given `clicks` in its data
    dict, with `use_click` set as MONAI Label sets it for a deepedit bundle."""
    from monai.bundle import run

    run(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        bundle_root=str(bundle),
        output_dir=str(out / "eval"),
        use_click=True,
        **{"dataset#data": [{"image": str(image), **clicks}]},
    )
    written = sorted((out / "eval").rglob("*.nii.gz"))
    assert len(written) == 1, written
    return np.asarray(nib.load(str(written[0])).dataobj)


def unpack(bundle_zip: Path, dest: Path) -> Path:
    with zipfile.ZipFile(bundle_zip) as archive:
        archive.extractall(dest)
    return next(path.parent.parent for path in dest.rglob("configs/metadata.json"))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    seg = make_bundle(root / "ct_seg", seed=3)
    ts_folder = make_bundle(root / "build" / "ct_seg_ts", seed=4, torchscript=True, train=False)
    deepedit = make_deepedit_bundle(root / "ct_deepedit", seed=5)
    return {
        "ct_seg": seg,
        "ct_seg_ts": zip_folder(ts_folder, root / "ct_seg_ts.zip"),
        "ct_seg_ts_folder": ts_folder,
        "ct_deepedit": deepedit,
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]) -> Iterator[Stack]:
    """Auth on (an admin and an annotator): only the training service may publish model versions,
    so it stores the --bundle paths and the other services wait for them."""
    root = tmp_path_factory.mktemp("bundle-stack")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    image = ct_image(root / f"{IMAGE}.nii.gz", seed=1)
    shutil.copy(image, studies / image.name)
    shutil.copy(root / f"{IMAGE}_label.nii.gz", studies / "labels" / "final" / image.name)
    users = UsersFile()
    users.add("alice", "alice-pw", [ADMIN])
    users.add("ann", "ann-pw", [ANNOTATOR])
    users.save(root / "users.json")
    running = start_stack(
        root, sample_studies=False,
        extra=["--auth-users", str(root / "users.json"), "--bundle", str(bundles["ct_seg"]), "--bundle", str(bundles["ct_seg_ts"]),
               "--bundle", str(bundles["ct_deepedit"])],
    )  # fmt: skip
    yield running
    stop_stack(running)


def token(stack: Stack, username: str) -> dict[str, str]:
    response = httpx.post(
        f"{stack.url}/auth/token", data={"username": username, "password": f"{username}-pw"}, timeout=30
    )
    assert response.status_code == 200, response.text
    return {"authorization": f"Bearer {response.json()['access_token']}"}


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    """The admin's client (tokens live 15 minutes or more: longer than this module runs)."""
    with httpx.Client(base_url=stack.url, timeout=120, headers=token(stack, "alice")) as client:
        yield client


def infer(http: httpx.Client, model: str, params: dict[str, Any] | None = None) -> nib.Nifti1Image:
    response = http.post(
        f"/infer/{model}", params={"image": IMAGE, "output": "image"}, data={"params": json.dumps(params or {})}
    )
    assert response.status_code == 200, response.text
    return nib.Nifti1Image.from_bytes(gzip.decompress(response.content))


def test_info_lists_bundles_with_labels_and_config(http: httpx.Client) -> None:
    info = http.get("/info/").json()
    for name in ("ct_seg", "ct_seg_ts"):
        model = info["models"][name]
        assert model["type"] == "segmentation"
        assert model["labels"] == {"organ_a": 1, "organ_b": 2}  # channel_def without background
        assert model["config"]["bundle_version"] == "0.1.0"
    assert info["models"]["ct_seg_ts"]["config"]["torchscript"] is True
    assert "ct_seg" in info["trainers"]  # has a train.json
    assert "ct_seg_ts" not in info["trainers"]  # TorchScript: served, not trained


@pytest.mark.parametrize("model", ["ct_seg", "ct_seg_ts"])
def test_label_equals_monai_bundle_run(
    http: httpx.Client, stack: Stack, bundles: dict[str, Path], model: str, tmp_path: Path
) -> None:
    folder = bundles["ct_seg" if model == "ct_seg" else "ct_seg_ts_folder"]
    image = stack.studies / f"{IMAGE}.nii.gz"
    expected = bundle_run(folder, image, tmp_path)
    label = infer(http, model)
    got = np.asarray(label.dataobj)
    assert got.shape == expected.shape == nib.load(str(image)).shape
    assert np.array_equal(got, expected), f"{int((got != expected).sum())} voxels differ"
    assert len(np.unique(expected)) > 1  # a real answer, not an empty label
    np.testing.assert_allclose(label.affine, nib.load(str(image)).affine, atol=1e-5)


def _bad_zip(tmp_path: Path, name: str, edit: Any) -> Path:
    folder = make_bundle(tmp_path / "src" / name, seed=9, train=False)
    extra = edit(folder) or {}
    return zip_folder(folder, tmp_path / f"{name}.zip", extra=extra)


def _unknown_network(folder: Path) -> None:
    config = json.loads((folder / "configs" / "inference.json").read_text())
    config["network_def"]["_target_"] = "NoSuchNetwork"
    (folder / "configs" / "inference.json").write_text(json.dumps(config))


def _wrong_label_count(folder: Path) -> None:
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    pred["channel_def"] = {"0": "background", "1": "a", "2": "b", "3": "c"}
    pred["num_channels"] = 4
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("case", "edit", "words"),
    [
        ("missing_config", lambda folder: (folder / "configs" / "inference.json").unlink(), "configs/inference.json"),
        ("unknown_network", _unknown_network, "network_def"),
        ("wrong_label_count", _wrong_label_count, "channel_def"),
        ("traversal", lambda folder: {"../../escaped.txt": b"owned"}, "outside the bundle"),
        ("vista3d", lambda folder: None, "point_labels"),  # the name says VISTA3D: its prompts are not supported
    ],
)
def test_bad_bundles_are_refused_and_nothing_is_stored(
    http: httpx.Client, stack: Stack, tmp_path: Path, case: str, edit: Any, words: str
) -> None:
    name = f"bad_{case}"
    archive = _bad_zip(tmp_path, name, edit)
    response = http.put(f"/model/{name}", files={"file": (f"{name}.zip", archive.read_bytes(), "application/zip")})
    assert response.status_code == 422, response.text
    assert words in response.json()["detail"]
    assert http.get(f"/model/{name}").status_code == 404
    assert name not in http.get("/info/").json()["models"]
    assert not list(stack.studies.parent.rglob("escaped.txt"))


def test_only_an_admin_adds_a_bundle(http: httpx.Client, stack: Stack, tmp_path: Path) -> None:
    archive = zip_folder(make_bundle(tmp_path / "src" / "ct_put", seed=6, train=False), tmp_path / "ct_put.zip")
    files = {"file": ("ct_put.zip", archive.read_bytes(), "application/zip")}
    refused = httpx.put(f"{stack.url}/model/ct_put", files=files, headers=token(stack, "ann"), timeout=120)
    assert refused.status_code == 403, refused.text
    assert "admin" in refused.json()["detail"]
    assert http.get("/model/ct_put").status_code == 404  # nothing stored

    # Nor straight to the datastore over gRPC (Envoy's port): UploadModelVersion is an annotator's
    # method, but a version of a `<name>.bundle` model is a bundle, refused before its bytes are read.
    header = ds_pb.UploadModelVersionHeader(
        model="models/ct_put.bundle", file_name="bundle.zip", size_bytes=archive.stat().st_size
    )
    messages = iter(
        [
            ds_pb.UploadModelVersionRequest(header=header),
            ds_pb.UploadModelVersionRequest(chunk=archive.read_bytes()[:1024]),
        ]
    )
    with grpc.insecure_channel(f"127.0.0.1:{stack.port}") as channel, pytest.raises(grpc.RpcError) as caught:
        ds_grpc.DatastoreServiceStub(channel).UploadModelVersion(
            messages, metadata=tuple(token(stack, "ann").items()), timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value.details()
    assert "admin" in (caught.value.details() or "")
    assert http.get("/model/ct_put").status_code == 404


def test_put_download_replace_bundle(http: httpx.Client, tmp_path: Path, stack: Stack) -> None:
    first = zip_folder(make_bundle(tmp_path / "a" / "ct_new", seed=11, train=False), tmp_path / "first.zip")
    response = http.put("/model/ct_new", files={"file": ("ct_new.zip", first.read_bytes(), "application/zip")})
    assert response.status_code == 200, response.text
    assert response.json()["bundle"]["labels"] == {"organ_a": 1, "organ_b": 2}
    wait_until(lambda: "ct_new" in http.get("/info/").json()["models"], what="the new bundle in /info/")
    download = http.get("/model/ct_new")
    assert download.status_code == 200 and download.content == first.read_bytes()

    # Replace it: inference answers as MONAI runs the new bundle.
    second_folder = make_bundle(tmp_path / "b" / "ct_new", seed=12, train=False)
    second = zip_folder(second_folder, tmp_path / "second.zip")
    response = http.put("/model/ct_new", files={"file": ("ct_new.zip", second.read_bytes(), "application/zip")})
    assert response.status_code == 200 and response.json()["changed"] is True
    assert http.get("/model/ct_new").content == second.read_bytes()
    expected = bundle_run(second_folder, stack.studies / f"{IMAGE}.nii.gz", tmp_path / "run")
    wait_until(
        lambda: np.array_equal(np.asarray(infer(http, "ct_new").dataobj), expected), what="the replaced bundle served"
    )


def test_scoring_runs_on_bundle_models(
    http: httpx.Client, stack: Stack, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """The app's scoring methods score a bundle model (POST /scoring/{method} with its name): the
    stored Dice equals the Dice of what monai.bundle.run writes against the final label."""
    from apps.api.activelearning import dice

    unlabeled = ct_image(tmp_path / "ct002.nii.gz", seed=2)  # epistemic scores unlabeled images
    uploaded = http.put(
        "/datastore/", params={"image": "ct002"}, files={"file": ("ct002.nii.gz", unlabeled.read_bytes())}
    )
    assert uploaded.status_code == 200, uploaded.text
    for method in ("dice", "epistemic"):
        response = http.post(f"/scoring/{method}", params={"run_sync": "true"}, json={"model": "ct_seg", "force": True})
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "DONE", response.json()
    assert http.get("/datastore/image/info", params={"image": "ct002"}).json()["epistemic_entropy"] > 0
    info = http.get("/datastore/image/info", params={"image": IMAGE}).json()
    expected = bundle_run(bundles["ct_seg"], stack.studies / f"{IMAGE}.nii.gz", tmp_path)
    final = np.asarray(nib.load(str(stack.studies / "labels" / "final" / f"{IMAGE}.nii.gz")).dataobj)
    assert info["dice"] == pytest.approx(dice(expected.astype(np.int64), final.astype(np.int64), [1, 2]), abs=1e-6)


def test_scoring_runs_on_a_deepedit_bundle(http: httpx.Client, tmp_path: Path) -> None:
    """An interactive (deepedit) bundle is scored with empty guidance channels, as its infer runs
    without clicks: each method's job ends DONE and the unlabeled image gets a finite score."""
    unlabeled = ct_image(tmp_path / "ct003.nii.gz", seed=3)
    uploaded = http.put(
        "/datastore/", params={"image": "ct003"}, files={"file": ("ct003.nii.gz", unlabeled.read_bytes())}
    )
    assert uploaded.status_code == 200, uploaded.text
    for method, key in (("epistemic", "epistemic_entropy"), ("tta", "tta_variance")):
        response = http.post(
            f"/scoring/{method}", params={"run_sync": "true"}, json={"model": "ct_deepedit", "force": True}
        )
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "DONE", response.text
        score = http.get("/datastore/image/info", params={"image": "ct003"}).json().get(key)
        assert score is not None and np.isfinite(score), (method, score)


def test_train_bundle_then_delete_goes_back_to_the_bundle_weights(
    http: httpx.Client, stack: Stack, bundles: dict[str, Path], tmp_path: Path
) -> None:
    assert http.get("/model/info/ct_seg").status_code == 404  # serving the bundle's own weights
    response = http.post("/train/ct_seg", params={"run_sync": "true"}, json={"max_epochs": 2, "val_split": 0.0})
    assert response.status_code == 200, response.text
    info = wait_until(
        lambda: (r := http.get("/model/info/ct_seg")).status_code == 200 and r.json(), what="a trained version"
    )
    assert not info["version"].startswith("initial-")
    trained = wait_until(
        lambda: (
            (
                r := http.post("/infer/ct_seg", params={"image": IMAGE, "output": "json"}, data={"params": "{}"})
            ).status_code
            == 200
            and r.json().get("model_version") == info["version"]
            and r.json()
        ),
        what="the trained version served",
    )
    assert trained["model_version"] == info["version"]

    # DELETE: info says 404 and inference serves the bundle's weights again (voxel for voxel).
    assert http.delete("/model/ct_seg").status_code == 200
    assert http.get("/model/info/ct_seg").status_code == 404
    expected = bundle_run(bundles["ct_seg"], stack.studies / f"{IMAGE}.nii.gz", tmp_path)
    wait_until(
        lambda: np.array_equal(np.asarray(infer(http, "ct_seg").dataobj), expected), what="the bundle's weights again"
    )


# DeepEdit multi-label clicks as Slicer / the official client send them: params[label] = [[i, j, k], ...].
CLICKS = {"organ": [[20, 18, 12], [10, 10, 5]], "background": [[2, 2, 2]], "label": "organ"}


def test_a_bundle_that_cannot_be_trained_is_refused_naming_why(http: httpx.Client) -> None:
    models = http.get("/info/").json()["models"]
    assert "ct_deepedit" in models and "ct_deepedit" not in http.get("/info/").json()["trainers"]
    for model, named in [("ct_deepedit", "train#trainer#iteration_update"), ("ct_seg_ts", "no configs/train.json")]:
        response = http.post(f"/train/{model}", json={"max_epochs": 1})
        assert response.status_code == 400, (model, response.status_code, response.text)
        assert named in response.json()["detail"], response.text
    assert http.post("/train/no_such_model", json={"max_epochs": 1}).status_code == 404


def test_deepedit_bundle_takes_clicks_as_monai_label_gives_them(
    http: httpx.Client, stack: Stack, bundles: dict[str, Path], tmp_path: Path
) -> None:
    model = http.get("/info/").json()["models"]["ct_deepedit"]
    assert model["type"] == "deepedit"  # from the bundle's name, as MONAI Label decides it
    assert model["labels"] == {"background": 0, "organ": 1}  # a deepedit bundle keeps background
    image = stack.studies / f"{IMAGE}.nii.gz"
    expected = deepedit_run(bundles["ct_deepedit"], image, tmp_path / "clicks", CLICKS)
    without = deepedit_run(bundles["ct_deepedit"], image, tmp_path / "none", {})
    assert int((expected != without).sum()) > 0  # the clicks change MONAI's own answer

    got = np.asarray(infer(http, "ct_deepedit", CLICKS).dataobj)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected), (
        f"{int((got != expected).sum())} voxels differ from monai.bundle's run with the clicks"
    )
    assert np.array_equal(np.asarray(infer(http, "ct_deepedit").dataobj), without)

    # clicks the model cannot take: a precise 4xx, as for the sample app's interactive models
    outside = http.post(
        "/infer/ct_deepedit",
        params={"image": IMAGE, "output": "image"},
        data={"params": json.dumps({"organ": [[99, 0, 0]]})},
    )
    assert outside.status_code == 422 and "outside the image" in outside.json()["detail"], outside.text
    unknown = http.post(
        "/infer/ct_deepedit",
        params={"image": IMAGE, "output": "image"},
        data={"params": json.dumps({"liver": [[1, 1, 1]]})},
    )
    assert unknown.status_code == 422 and "liver" in unknown.json()["detail"], unknown.text
