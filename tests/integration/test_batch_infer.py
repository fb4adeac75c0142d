"""Batch inference (MONAI Label's /batch/infer) through the gateway on the real inference
service: 20 small images, a client that hangs up mid-run, stop, 429, image selection."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.contract.helpers import nifti_bytes
from tests.fixtures.gateway import GatewayStack
from tests.fixtures.polling import wait_until

pytestmark = pytest.mark.timeout(300)

COUNT = 20
SMALL = {"roi_size": [32, 32, 32]}  # a params key every inference of the batch gets (and a smaller window)


def last_task(url: str) -> dict[str, Any]:
    answer = httpx.get(f"{url}/batch/infer", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def finished(url: str) -> dict[str, Any] | None:
    task = last_task(url)
    return task if task["status"] in ("DONE", "ERROR", "STOPPED") else None


def tags_of(url: str, image: str) -> set[str]:
    info = httpx.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()
    return set(info["objects"][image]["labels"]) if image in info["objects"] else set()


@pytest.fixture(scope="module")
def stack(inference_stack: GatewayStack) -> str:
    url = inference_stack.url
    assert httpx.get(f"{url}/batch/infer").status_code == 404  # no task yet, as MONAI Label
    for number in range(COUNT):
        answer = httpx.put(
            f"{url}/datastore/image",
            params={"image": f"batch_{number:02d}"},
            files={"file": (f"batch_{number:02d}.nii.gz", nifti_bytes((20, 20, 20), seed=number))},
        )
        assert answer.status_code == 200, answer.text
    # Two of them already have a final label: "unlabeled" leaves them out.
    for image in ("batch_03", "batch_11"):
        saved = httpx.put(
            f"{url}/datastore/label",
            params={"image": image},
            files={"label": ("l.nii.gz", nifti_bytes((20, 20, 20), dtype="uint8"))},
        )
        assert saved.status_code == 200, saved.text
    return url


def test_batch_survives_a_client_that_hangs_up(stack: str) -> None:
    url = stack
    # run_sync, and the client gives up after a fraction of a second: the job goes on.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{url}/batch/infer/segmentation",
            params={"images": "all", "run_sync": "true"},
            json={
                "device": "cuda",
                "multi_gpu": True,
                "gpus": "all",
                "label_tag": "original",
                "max_workers": 1,
                **SMALL,
            },
            timeout=httpx.Timeout(30.0, read=0.3),
        )
    running = last_task(url)
    assert running["status"] in ("SUBMITTED", "RUNNING")
    assert running["request"]["model"] == "segmentation" and running["request"]["images"] == "all"
    assert running["request"]["roi_size"] == [32, 32, 32]
    # a second start while it runs: 429, as MONAI Label
    again = httpx.post(f"{url}/batch/infer/segmentation", json={})
    assert again.status_code == 429 and "Already Running" in again.json()["detail"]
    done = wait_until(lambda: finished(url), "the batch to end", timeout=120)
    assert done["status"] == "DONE", done
    assert done["progress"] == {"total": COUNT, "done": COUNT, "failed": 0}
    assert "end_ts" in done and any("batch_19" in line for line in done["details"])
    info = httpx.get(f"{url}/datastore/", params={"output": "all"}).json()
    for number in range(COUNT):
        assert "original" in info["objects"][f"batch_{number:02d}"]["labels"]
    label = httpx.get(f"{url}/datastore/label", params={"label": "batch_07", "tag": "original"})
    assert label.status_code == 200 and label.content[:2] == b"\x1f\x8b"
    assert httpx.get(f"{url}/batch/infer", params={"check_if_running": "true"}).status_code == 404
    every = httpx.get(f"{url}/batch/infer", params={"all": "true"}).json()
    assert every[-1]["id"] == done["id"]


def test_unlabeled_list_max_and_tag(stack: str) -> None:
    url = stack
    # run_sync answers MONAI Label's per-image dict {image_id: {"label", "tag", "params"}}, not a task
    answer = httpx.post(
        f"{url}/batch/infer/segmentation",
        params={"images": "unlabeled", "run_sync": "true"},
        json={"label_tag": "pre", "max_batch_size": 4, "multi_gpu": False, "device": "cpu", **SMALL},
        timeout=120,
    ).json()
    assert list(answer) == ["batch_00", "batch_01", "batch_02", "batch_04"]
    for image, outcome in answer.items():
        assert set(outcome) == {"label", "tag", "params"}
        assert outcome["label"] == image and outcome["tag"] == "pre"
        assert outcome["params"]["label_names"] and outcome["params"]["device"] == "cpu"
        assert "total" in outcome["params"]["latencies"]
    task = last_task(url)
    assert task["status"] == "DONE" and task["progress"]["total"] == 4
    assert task["request"]["device"] == ["cpu"] and task["request"]["label_tag"] == "pre"
    # sorted ids, labeled ones (03, 11) left out
    assert {image for image in (f"batch_{n:02d}" for n in range(COUNT)) if "pre" in tags_of(url, image)} == {
        "batch_00",
        "batch_01",
        "batch_02",
        "batch_04",
    }
    listed = httpx.post(
        f"{url}/batch/infer/segmentation",
        params={"run_sync": "true"},
        json={"images": ["batch_11", "batch_03"], "label_tag": "listed", **SMALL},
        timeout=120,
    ).json()
    assert list(listed) == ["batch_11", "batch_03"] and listed["batch_03"]["tag"] == "listed"
    assert last_task(url)["request"]["images"] == ["batch_11", "batch_03"]
    assert "listed" in tags_of(url, "batch_03") and "listed" in tags_of(url, "batch_11")
    assert "listed" not in tags_of(url, "batch_04")


def test_stop_keeps_what_was_saved(stack: str) -> None:
    url = stack
    started = httpx.post(f"{url}/batch/infer/segmentation", json={"label_tag": "stopped"}, timeout=30)
    assert started.status_code == 200 and started.json()["status"] in ("SUBMITTED", "RUNNING")
    wait_until(lambda: last_task(url)["progress"]["done"] >= 1, "one image done", timeout=120)
    stopped = httpx.delete(f"{url}/batch/infer", timeout=60)
    assert stopped.status_code == 200 and stopped.json()["status"] == "STOPPED"
    task = last_task(url)
    assert task["status"] == "STOPPED" and 1 <= task["progress"]["done"] < COUNT
    saved = [n for n in range(COUNT) if "stopped" in tags_of(url, f"batch_{n:02d}")]
    assert len(saved) >= task["progress"]["done"]
    assert httpx.delete(f"{url}/batch/infer").json() is None  # nothing runs: null, as MONAI Label
    # a new batch may start at once
    after = httpx.post(
        f"{url}/batch/infer/segmentation", params={"run_sync": "true"}, json={"images": ["batch_05"]}, timeout=60
    )
    assert after.status_code == 200 and after.json()["batch_05"]["label"] == "batch_05"
    assert last_task(url)["status"] == "DONE"
    # a task (not run_sync) keeps no per-image results: the answers stay small
    assert "results" not in last_task(url)


def test_bad_batch_requests(stack: str) -> None:
    url = stack
    assert httpx.post(f"{url}/batch/infer/no_such_model", json={}).status_code == 404
    assert httpx.post(f"{url}/batch/infer/segmentation", params={"images": "some"}, json={}).status_code == 422
    assert httpx.post(f"{url}/batch/infer/segmentation", json={"images": [1, 2]}).status_code == 422
    assert httpx.post(f"{url}/batch/infer/segmentation", json={"images": ["../x"]}).status_code == 400
    assert httpx.post(f"{url}/batch/infer/segmentation", json={"max_batch_size": -1}).status_code == 422
    assert httpx.post(f"{url}/batch/infer/segmentation", json={"device": "cuda:7", "multi_gpu": False}).status_code in (
        400,
        422,
    )
    missing = httpx.post(
        f"{url}/batch/infer/segmentation",
        params={"run_sync": "true"},
        json={"images": ["batch_01", "nope"]},
        timeout=60,
    ).json()
    # the image that failed answers {} in MONAI Label's run_sync dict; the job goes on
    assert missing["nope"] == {} and missing["batch_01"]["tag"] == "original"
    task = last_task(url)
    assert task["status"] == "DONE" and task["progress"] == {"total": 2, "done": 1, "failed": 1}
    assert any("nope: failed" in line for line in task["details"])
