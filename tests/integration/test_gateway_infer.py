"""POST /infer/{model} end to end: the official client, Slicer's and OHIF's requests through the
gateway to the real inference service (the sample radiology app on the CPU) and the real
datastore, all on loopback ports.

No mocks: the label that comes back was computed by the app's networks on the uploaded
volume, so these tests check the gateway's translation *and* that the result lands on the
image's grid in every format a viewer asks for.
"""

from __future__ import annotations

import asyncio
import gzip
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import nrrd
import numpy as np
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from services.common.datastore_client import DatastoreClient
from services.common.models.volumes import nrrd_affine
from services.common.protos import struct_to_dict
from services.datastore.sample_studies import synthetic_volume
from tests.fixtures.gateway import GatewayStack
from tests.fixtures.polling import wait_until

pytestmark = pytest.mark.timeout(120)

# Not cubic, not isotropic, not at the origin: a swapped axis or a lost affine shows.
SHAPE = (32, 28, 24)
AFFINE = np.array([[1.5, 0, 0, -20.0], [0, 1.5, 0, 7.5], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])
IMAGE_ID = "spheres_gw"
CLICK = [16, 14, 12]
LABELS = {"sphere_a": 1, "sphere_b": 2}
# (model, the params a viewer sends, the label_names the answer must carry)
MODEL_CASES: list[tuple[str, dict[str, Any], dict[str, int]]] = [
    ("segmentation", {}, LABELS),
    (
        "deepgrow",
        {"label": "sphere_a", "foreground": [CLICK], "background": []},
        {"sphere_a": 1},
    ),
    (
        "deepedit",
        {"label": "sphere_a", "sphere_a": [CLICK], "sphere_b": [], "background": []},
        LABELS,
    ),
]


def volume_bytes(seed: int, shape: tuple[int, int, int] = SHAPE) -> bytes:
    """A gzipped NIfTI of bright spheres on noise (the sample app's kind of study)."""
    image, _ = synthetic_volume(np.random.default_rng(seed), size=max(shape))
    data = np.ascontiguousarray(image[: shape[0], : shape[1], : shape[2]])
    return gzip.compress(nib.Nifti1Image(data, AFFINE).to_bytes(), compresslevel=1, mtime=0)


def load_nifti(path: str | Path) -> nib.Nifti1Image:
    image = nib.load(str(path))
    assert isinstance(image, nib.Nifti1Image)
    return image


def assert_on_image_grid(voxels: np.ndarray, affine: np.ndarray, labels: dict[str, int]) -> None:
    assert voxels.shape == SHAPE
    np.testing.assert_allclose(affine, AFFINE, atol=1e-5)
    assert set(np.unique(voxels).tolist()) <= {0, *labels.values()}


def multipart_parts(response: httpx.Response) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart answer, split strictly by its boundary."""
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    delimiter = b"--" + content_type.split("boundary=", 1)[1].encode()
    body = response.content
    closing = delimiter + b"--\r\n"
    assert body.startswith(delimiter + b"\r\n") and body.endswith(closing)
    parts: dict[str, tuple[str | None, bytes]] = {}
    for piece in body[: -len(closing)].split(delimiter)[1:]:
        head, _, data = piece[2:].partition(b"\r\n\r\n")
        assert data.endswith(b"\r\n")
        name = re.search(rb'; name="([^"]*)"', head)
        filename = re.search(rb'; filename="([^"]*)"', head)
        assert name is not None
        parts[name[1].decode()] = (
            filename[1].decode() if filename else None,
            data[:-2],
        )
    return parts


def assert_json_error(response: httpx.Response, *statuses: int) -> str:
    """A clear 4xx: the expected status, MONAI Label's JSON `detail`, never a 500."""
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert detail
    return str(detail)


@pytest.fixture(scope="module")
def stack(inference_stack: GatewayStack) -> GatewayStack:
    return inference_stack


@pytest.fixture(scope="module")
def uploaded(stack: GatewayStack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """IMAGE_ID in the datastore, uploaded as Slicer does (the official client's upload_image)."""
    tmp = tmp_path_factory.mktemp("upload")
    client = MONAILabelClient(stack.url, tmpdir=str(tmp), client_id="tester")
    path = tmp / f"{IMAGE_ID}.nii.gz"
    path.write_bytes(volume_bytes(seed=3))
    assert client.upload_image(str(path), IMAGE_ID) == {"image": IMAGE_ID}
    return IMAGE_ID


@pytest.fixture
def client(stack: GatewayStack, uploaded: str, tmp_path: Path) -> MONAILabelClient:
    return MONAILabelClient(stack.url, tmpdir=str(tmp_path), client_id="tester")


@pytest.fixture
def http(stack: GatewayStack, uploaded: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        yield client


def test_info_lists_the_apps_models(client: MONAILabelClient) -> None:
    info = client.info()
    assert "config" not in info
    # No app-level labels: the union of the models' labels, as a list (MONAI Label; OHIF's panel needs a list).
    assert info["name"] == "radiology"
    assert info["labels"][:2] == ["sphere_a", "sphere_b"] and isinstance(info["labels"], list)
    assert {label for model in info["models"].values() for label in model["labels"]} == set(info["labels"])
    models = info["models"]
    # The sample models (the app may serve more, e.g. segmentation_brain).
    assert {m: models[m]["type"] for m in ("segmentation", "deepgrow", "deepedit")} == {
        "segmentation": "segmentation",
        "deepgrow": "deepgrow",
        "deepedit": "deepedit",
    }
    assert models["segmentation"]["labels"] == LABELS
    assert models["segmentation"]["dimension"] == 3


@pytest.mark.parametrize(("model", "params", "label_names"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_client_infer_each_model(
    client: MONAILabelClient,
    model: str,
    params: dict[str, Any],
    label_names: dict[str, int],
) -> None:
    path, result = client.infer(model, IMAGE_ID, params)
    assert path is not None and path.endswith(".nii.gz")
    label = load_nifti(path)
    assert_on_image_grid(np.asarray(label.dataobj), label.affine, label_names)
    assert result["label_names"] == label_names
    assert result["model"] == model and result["device"] == "cpu"
    assert {"pre", "infer", "post", "write", "total"} <= set(result["latencies"])


def test_slicer_request_gets_nrrd_in_multipart(client: MONAILabelClient, http: httpx.Client) -> None:
    """Slicer: no `output`, .nrrd + uint8; parts `params` then `image`, in that order."""
    params = '{"result_extension": ".nrrd", "result_dtype": "uint8", "client_id": "user-xyz"}'
    response = http.post("/infer/segmentation", params={"image": IMAGE_ID}, data={"params": params})
    assert response.status_code == 200, response.text
    assert int(response.headers["content-length"]) == len(response.content)
    parts = multipart_parts(response)
    assert list(parts) == ["params", "image"]
    assert parts["params"][0] is None
    result = httpx.Response(200, content=parts["params"][1]).json()
    assert result["label_names"] == LABELS
    filename, data = parts["image"]
    assert filename is not None and filename.endswith(".nrrd") and "/" not in filename
    nrrd_path = Path(client._tmpdir) / filename
    nrrd_path.write_bytes(data)
    voxels, header = nrrd.read(str(nrrd_path))
    assert voxels.dtype == np.uint8
    assert_on_image_grid(voxels, nrrd_affine(header), LABELS)
    # The same inference through the official client (NIfTI, float32) holds the same labels.
    path, _ = client.infer("segmentation", IMAGE_ID, {})
    np.testing.assert_array_equal(np.asarray(load_nifti(path).dataobj), voxels)


def test_ohif_output_image_is_raw_nrrd(http: httpx.Client, tmp_path: Path) -> None:
    params = (
        '{"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": false, "restore_label_idx": false}'
    )
    response = http.post(
        "/infer/segmentation",
        params={"image": IMAGE_ID, "output": "image"},
        data={"params": params},
    )
    assert response.status_code == 200, response.text
    assert int(response.headers["content-length"]) == len(response.content)
    disposition = response.headers["content-disposition"]
    assert re.fullmatch(r'attachment; filename="[^"/]+\.nrrd"', disposition)
    path = tmp_path / "ohif.nrrd"
    path.write_bytes(response.content)
    voxels, header = nrrd.read(str(path))
    assert header["encoding"] == "raw" and voxels.dtype == np.uint8
    assert_on_image_grid(voxels, nrrd_affine(header), LABELS)


def test_output_json_is_params_only(http: httpx.Client) -> None:
    response = http.post(
        "/infer/deepgrow",
        params={"image": IMAGE_ID, "output": "json"},
        data={"params": f'{{"label": "sphere_b", "foreground": [{CLICK}]}}'},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    result = response.json()
    assert result["label_names"] == {"sphere_b": 1}
    assert result["latencies"]["total"] > 0


def test_save_label_counts_in_the_datastore(client: MONAILabelClient, http: httpx.Client, tmp_path: Path) -> None:
    """Slicer's loop: infer with save_label (tag `original`), then save the final label."""
    image = tmp_path / "to_label.nii.gz"
    image.write_bytes(volume_bytes(seed=4))
    before = http.get("/datastore/", params={"output": "stats"}).json()
    client.upload_image(str(image), "to_label")

    path, result = client.infer("segmentation", "to_label", {"save_label": True})
    stats = http.get("/datastore/", params={"output": "stats"}).json()
    assert stats["total"] == before["total"] + 1
    assert stats["completed"] == before["completed"]
    original = before["label_tags"].get("original", 0) + 1
    assert stats["label_tags"]["original"] == original
    saved = http.get("/datastore/label", params={"label": "to_label", "tag": "original"})
    assert saved.status_code == 200
    (tmp_path / "saved.nii.gz").write_bytes(saved.content)
    np.testing.assert_array_equal(
        np.asarray(load_nifti(tmp_path / "saved.nii.gz").dataobj),
        np.asarray(load_nifti(path).dataobj),
    )

    label_info = [{"name": n, "idx": i} for n, i in result["label_names"].items()]
    answer = client.save_label("to_label", path, params={"label_info": label_info})
    assert answer["image"] == "to_label"
    stats = http.get("/datastore/", params={"output": "stats"}).json()
    assert stats["completed"] == before["completed"] + 1
    assert stats["label_tags"]["final"] == before["label_tags"].get("final", 0) + 1
    labeled = http.get("/datastore/", params={"output": "train"}).json()
    assert any(entry["image"].endswith("image=to_label") for entry in labeled)


def test_infer_on_an_uploaded_file_and_a_session(client: MONAILabelClient, tmp_path: Path) -> None:
    local = tmp_path / "local_scan.nii.gz"
    local.write_bytes(volume_bytes(seed=5))
    path, result = client.infer("segmentation", "", {}, file=str(local))
    label = load_nifti(path)
    assert_on_image_grid(np.asarray(label.dataobj), label.affine, LABELS)
    assert result["label_names"] == LABELS

    session_id = client.create_session(str(local))["session_id"]
    path, _ = client.infer(
        "deepgrow",
        "",
        {"label": "sphere_a", "foreground": [CLICK]},
        session_id=session_id,
    )
    label = load_nifti(path)
    assert_on_image_grid(np.asarray(label.dataobj), label.affine, {"sphere_a": 1})
    client.remove_session(session_id)


def test_unknown_model_and_image_are_404(client: MONAILabelClient, http: httpx.Client) -> None:
    with pytest.raises(MONAILabelClientException, match="Status: 404"):
        client.infer("nope", IMAGE_ID, {})
    assert "nope" in assert_json_error(http.post("/infer/nope", params={"image": IMAGE_ID}), 404)
    assert_json_error(http.post("/infer/segmentation", params={"image": "missing"}), 404)
    assert_json_error(http.post("/infer/segmentation", params={"session_id": "no-such-session"}), 404)
    assert_json_error(http.post("/infer/segmentation"), 400)


def test_bad_params_are_4xx(http: httpx.Client) -> None:
    def infer(model: str, params: str) -> httpx.Response:
        return http.post(f"/infer/{model}", params={"image": IMAGE_ID}, data={"params": params})

    assert "outside the image" in assert_json_error(infer("deepgrow", '{"foreground": [[32, 0, 0]]}'), 422)
    assert "outside the image" in assert_json_error(infer("deepedit", '{"sphere_a": [[0, -1, 0]]}'), 422)
    assert_json_error(infer("deepgrow", '{"foreground": [[1, 2]]}'), 422)
    assert_json_error(infer("segmentation", "{not json"), 422)
    assert_json_error(infer("segmentation", "[1, 2]"), 422)
    assert_json_error(infer("segmentation", '{"result_extension": ".png"}'), 422)
    assert_json_error(infer("segmentation", '{"result_dtype": "complex64"}'), 422)
    assert_json_error(
        http.post("/infer/segmentation", params={"image": IMAGE_ID, "output": "bogus"}),
        422,
    )


def test_bad_uploads_are_4xx_and_leave_nothing(stack: GatewayStack, http: httpx.Client) -> None:
    whole = volume_bytes(seed=6)
    raw = gzip.decompress(whole)
    cases = [
        ("notes.txt", b"just some text, not a volume\n" * 20),
        ("notes.nii.gz", b"just some text, not a volume\n" * 20),
        ("cut.nii.gz", whole[: len(whole) // 2]),
        ("cut.nii", raw[: len(raw) // 2]),
        ("header_only.nii", raw[:352]),
        ("empty.nii.gz", b""),
    ]
    for file_name, data in cases:
        response = http.post(
            "/infer/segmentation",
            data={"params": "{}"},
            files={"file": (file_name, data, "application/octet-stream")},
        )
        detail = assert_json_error(response, 400, 413, 415, 422)
        assert str(stack.root) not in detail, "the service's scratch paths must not leak"

    # The service removes a request's scratch dir after its last message is sent, which can
    # be just after the HTTP answer completed: wait for it to go.
    def leftovers() -> list[Path]:
        return [*(stack.root / "infer" / "uploads").glob("*"), *(stack.root / "infer").glob("infer-*")]

    wait_until(lambda: not leftovers(), "uploads and scratch dirs to be removed", timeout=5)


def _serving_info(stack: GatewayStack, model: str) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        client = DatastoreClient(stack.datastore_address, timeout_seconds=30)
        try:
            answer = await client.stub.GetModelVersion(
                ds_pb.GetModelVersionRequest(name=f"models/{model}/versions/serving"), timeout=30
            )
        finally:
            await client.close()
        return struct_to_dict(answer.model_version.info)

    return asyncio.run(read())


def test_model_weights_publish_download_and_hot_reload(stack: GatewayStack, http: httpx.Client) -> None:
    """MONAI Label's /model/{model}: PUT publishes weights that inference serves next, GET
    returns them, DELETE falls back to the untrained network. Runs last: it changes a model."""
    import hashlib

    from services.common.apps import load_app
    from tests.fixtures.inference import constant_class_weights

    model = "segmentation_brain"  # no other test here uses it
    missing = http.get(f"/model/{model}")
    assert missing.status_code == 404
    assert missing.json() == {"detail": f"Model File NOT Found for {model}"}
    assert http.get(f"/model/info/{model}").status_code == 404
    assert http.put("/model/nope", files={"file": ("model.pt", b"x")}).status_code == 404
    assert http.get("/model/..%2Fx").status_code in (400, 404)

    weights = constant_class_weights(load_app("apps.radiology").infer_tasks[model], winner=1)
    published = http.put(f"/model/{model}", files={"file": ("model.pt", weights)})
    assert published.status_code == 200, published.text
    assert published.json()["checksum"] == "SHA256:" + hashlib.sha256(weights).hexdigest()

    download = http.get(f"/model/{model}")
    assert download.status_code == 200 and download.content == weights
    assert f'filename="{model}.pt"' in download.headers["content-disposition"]
    assert http.get(f"/model/info/{model}").json()["checksum"] == published.json()["checksum"]

    def answered_by_published() -> bool:
        response = http.post(f"/infer/{model}", params={"image": IMAGE_ID, "output": "image"}, data={"params": "{}"})
        assert response.status_code == 200, response.text
        label = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
        return set(np.unique(np.asarray(label.dataobj)).tolist()) == {1}

    # The stack's inference service re-checks the serving version every 0.2 s: the published
    # weights answer from its next check on (only they label every voxel 1).
    wait_until(answered_by_published, "the published weights to answer", timeout=60, interval=0.2)

    assert http.delete(f"/model/{model}").json() == {}
    assert http.get(f"/model/{model}").status_code == 404
    # The reset version says what it is, as one a service publishes (services.common.bundles).
    assert _serving_info(stack, model) == {"reset": True, "reason": "DELETE /model"}
