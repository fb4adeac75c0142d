"""MONAI Label's /train routes and /info's trainers through the gateway, driven by the official
`monailabel` client, over a real datastore and a real training service process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from monailabel.client import MONAILabelClient

from tests.fixtures.gateway import GatewayStack, gateway_with_training
from tests.fixtures.polling import wait_until


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    with gateway_with_training(tmp_path_factory.mktemp("train-gateway")) as (stack, _training):
        yield stack


def wait_status(client: MONAILabelClient, status: str, timeout: float = 180) -> dict[str, Any]:
    def task_in_status() -> dict[str, Any] | None:
        task: dict[str, Any] = client.train_status()
        return task if task["status"] == status else None

    return wait_until(task_in_status, f"the train task to be {status}", timeout=timeout, interval=0.5)


def test_train_routes_with_the_monailabel_client(stack: GatewayStack) -> None:
    client = MONAILabelClient(stack.url + "/")
    http = httpx.Client(base_url=stack.url)
    info = client.info()
    assert list(info["trainers"]) == ["segmentation", "segmentation_brain", "deepgrow", "deepedit"]
    assert info["trainers"]["segmentation"]["config"]["max_epochs"] > 0
    assert info["trainers"]["segmentation"]["labels"] == {"sphere_a": 1, "sphere_b": 2}
    assert info["train_stats"]["segmentation"] == {}
    assert http.get("/train/").json() == {"detail": "No Train Tasks Found"}
    assert client.train_status(check_if_running=True) is False
    assert client.train_stop() is None  # stop when idle: 200 null

    # Stricter than MONAI Label: an unknown model is 404 at once; bad params are 4xx.
    response = http.post("/train/nope", json={})
    assert response.status_code == 404 and "nope" in response.json()["detail"]
    response = http.post("/train/segmentation", json={"max_epochs": -1})
    assert response.status_code == 400 and "max_epochs" in response.json()["detail"]
    response = http.post("/train/segmentation", json={"device": "cuda:3"})
    assert response.status_code == 400 and "cuda:3" in response.json()["detail"]

    task = client.train_start("segmentation", {"max_epochs": 200, "dataset": "Dataset", "device": ["cpu"]})
    assert task["status"] in ("SUBMITTED", "RUNNING") and task["request"]["model"] == "segmentation"
    assert task["request"]["max_epochs"] == 200
    running = wait_status(client, "RUNNING")
    assert running["id"] == task["id"] and running["details"]
    assert client.train_status(check_if_running=True) is True
    # A second start while one runs: MONAI Label's 429.
    second = http.post("/train/segmentation", json={"max_epochs": 1})
    assert second.status_code == 429 and second.json() == {"detail": "++++++++++ Train Task is Already Running"}
    stopped = client.train_stop()
    assert stopped["id"] == task["id"] and stopped["status"] == "STOPPED" and "end_ts" in stopped
    assert client.train_status(check_if_running=True) is False

    # OHIF's "run all" route: one task per trainer, queued one after another.
    result = http.post("/train/", json={"max_epochs": 1, "val_split": 0.0}).json()
    assert set(result) == {"segmentation", "segmentation_brain", "deepgrow", "deepedit"}
    assert all(
        entry["detail"] is None and entry["result"]["status"] in ("SUBMITTED", "RUNNING") for entry in result.values()
    )
    listed = http.get("/train/", params={"all": "true"}).json()
    assert next(t["id"] for t in listed) == task["id"] and len(listed) == 5

    def stopped_running() -> bool:
        if not client.train_status(check_if_running=True):
            return True
        client.train_stop()
        return False

    wait_until(stopped_running, "the running task to stop", timeout=120, interval=0.2)

    # Stop the queued ones too: each becomes RUNNING in turn, then stopped.
    def stopped_all() -> bool:
        tasks = http.get("/train/", params={"all": "true"}).json()
        if not any(t["status"] in ("SUBMITTED", "RUNNING") for t in tasks):
            return True
        client.train_stop()
        return False

    wait_until(stopped_all, "every queued task to run and be stopped", timeout=120, interval=0.3)
    statuses = [t["status"] for t in http.get("/train/", params={"all": "true"}).json()]
    assert statuses.count("STOPPED") + statuses.count("DONE") + statuses.count("ERROR") == 5
