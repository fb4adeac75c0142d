"""MONAI Label's /activelearning and /scoring routes through the real gateway, the real active
learning service and a real datastore; the official `MONAILabelClient` drives next_sample."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from services.activelearning.service import start_service
from services.activelearning.settings import ActiveLearningSettings
from tests.contract.helpers import nifti_bytes
from tests.fixtures.gateway import GatewayStack
from tests.fixtures.polling import wait_until
from tests.ports import free_port

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    root = tmp_path_factory.mktemp("al-gateway")
    holder: dict[str, Any] = {}

    async def start_activelearning(datastore_address: str) -> tuple[str, Any]:
        # The stack's hook for a second service: serve active learning next to the datastore
        # and point the gateway at it; no inference service (a closed port) is needed here.
        settings = ActiveLearningSettings(
            port=0, metrics_port=-1, datastore=datastore_address, device="cpu", work_dir=root / "al", torch_threads=1
        )
        server, _service = await start_service(settings)
        holder["stack"].gateway_overrides["activelearning_address"] = server.address
        return f"127.0.0.1:{free_port()}", server

    gateway = GatewayStack(root, start_inference=start_activelearning)
    holder["stack"] = gateway
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def http(stack: GatewayStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=120) as client:
        yield client


def client(stack: GatewayStack, tmp_path: Path, client_id: str) -> MONAILabelClient:
    return MONAILabelClient(stack.url, tmpdir=str(tmp_path), client_id=client_id)


def test_empty_datastore_answers_empty_with_the_reason(http: httpx.Client) -> None:
    response = http.post("/activelearning/first", json={"client_id": "c"})
    assert response.status_code == 200 and response.json() == {}
    assert response.headers["x-labelgrid-no-sample"] == "EMPTY"


def test_info_lists_strategies_and_scoring(http: httpx.Client) -> None:
    info = http.get("/info/").json()
    assert set(info["strategies"]) == {"random", "first", "epistemic", "tta"}
    assert info["strategies"]["first"] == {"description": "Get First Sample"}
    assert set(info["scoring"]) == {"epistemic", "tta", "dice"}
    assert "config" not in info


def test_official_client_next_sample_leases_per_annotator(
    stack: GatewayStack, http: httpx.Client, tmp_path: Path
) -> None:
    one, two = client(stack, tmp_path, "radiologist-1"), client(stack, tmp_path, "radiologist-2")
    for n in range(3):
        path = tmp_path / f"case_{n}.nii.gz"
        path.write_bytes(nifti_bytes((8, 8, 8), seed=n))
        one.upload_image(str(path), f"case_{n}")
    first = one.next_sample("first", {})
    second = two.next_sample("first", {})
    # MONAI Label would give both the same image; here each holds its own.
    assert (first["id"], second["id"]) == ("case_0", "case_1")
    assert first["name"] == "case_0.nii.gz" and first["checksum"].startswith("SHA256:")
    assert first["lease"]["client_id"] == "radiologist-1"
    # Slicer downloads from `path` when it is not a file on its disk: it is this gateway's URL.
    download = http.get(first["path"])
    assert download.status_code == 200 and download.content == nifti_bytes((8, 8, 8), seed=0)
    # Saving the final label ends the lease; the image never comes back.
    label = tmp_path / "label.nii.gz"
    label.write_bytes(nifti_bytes((8, 8, 8), seed=7, dtype="uint8"))
    one.save_label("case_0", str(label), params={"label_info": [{"name": "sphere_a", "idx": 1}]})
    again = one.next_sample("first", {})
    assert again["id"] == "case_2"
    info = http.get("/datastore/image/info", params={"image": "case_2"}).json()
    assert info["strategy"]["first"]["client_id"] == "radiologist-1"
    # Both remaining images are held: the next annotator is told so, in MONAI Label's shape.
    response = http.post("/activelearning/random", json={"client_id": "radiologist-3"})
    assert response.json() == {} and response.headers["x-labelgrid-no-sample"] == "ALL_LEASED"


def test_bad_input_on_activelearning_routes(stack: GatewayStack, http: httpx.Client, tmp_path: Path) -> None:
    unknown = http.post("/activelearning/nope", json={"client_id": "c"})
    assert unknown.status_code == 404 and "strategy 'nope' does not exist" in unknown.json()["detail"]
    with pytest.raises(MONAILabelClientException):
        client(stack, tmp_path, "c").next_sample("nope", {})
    assert http.post("/activelearning/..%2Fx", json={}).status_code in (400, 404)
    assert (
        http.post("/activelearning/first", content=b"[1]", headers={"content-type": "application/json"}).status_code
        == 422
    )
    assert http.post("/activelearning/first", json={"client_id": 5}).status_code == 422
    assert http.post("/activelearning/first", json={"lease_ttl_seconds": -1}).status_code == 400
    assert http.post("/scoring/nope", json={}).status_code == 404
    assert http.post("/scoring/epistemic", json={"model": "nope"}).status_code == 404


def test_scoring_routes_in_monai_label_task_shape(http: httpx.Client) -> None:
    assert http.delete("/scoring/").json() is None
    assert http.get("/scoring/", params={"check_if_running": "true"}).status_code == 404
    done = http.post("/scoring/tta", params={"run_sync": "true"}, json={"flips": 2, "client_id": "x"})
    assert done.status_code == 200, done.text
    task = done.json()
    assert task["status"] == "DONE" and task["request"]["method"] == "tta" and task["request"]["flips"] == 2
    assert task["start_ts"] and task["end_ts"] and task["details"]
    assert task["result"]["scored"] + task["result"]["skipped"] == task["progress"]["total"]
    assert http.get("/scoring/").json()["id"] == task["id"]
    assert task["id"] in [t["id"] for t in http.get("/scoring/", params={"all": "true"}).json()]

    running = http.post("/scoring/epistemic", json={"passes": 64, "force": True}).json()
    assert running["status"] in ("SUBMITTED", "RUNNING")
    busy = http.post("/scoring/epistemic", json={})
    assert busy.status_code == 429
    wait_until(
        lambda: http.get("/scoring/", params={"check_if_running": "true"}).status_code == 200,
        "the scoring job to run",
        timeout=30,
    )
    stopped = http.delete("/scoring/").json()
    assert stopped["id"] == running["id"] and stopped["status"] == "STOPPED" and stopped["end_ts"]
    assert http.get("/scoring/", params={"check_if_running": "true"}).status_code == 404
    all_methods = http.post("/scoring/", json={"dice": {}}).json()
    assert set(all_methods) == {"epistemic", "tta", "dice"}
    assert all(entry["detail"] is None and entry["result"]["id"] for entry in all_methods.values())
