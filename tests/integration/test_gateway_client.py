"""The official `monailabel.client.MONAILabelClient` against a real gateway and datastore."""

from __future__ import annotations

from pathlib import Path

import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from tests.contract.helpers import nifti_bytes

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def client(gateway_url: str, tmp_path: Path) -> MONAILabelClient:
    return MONAILabelClient(gateway_url, tmpdir=str(tmp_path), client_id="tester")


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_auth_is_off(client: MONAILabelClient) -> None:
    assert client.auth_enabled() is False
    assert client.auth_valid_token() is True


def test_info_without_inference_service(client: MONAILabelClient) -> None:
    info = client.info()
    assert "config" not in info
    assert info["models"] == {} and info["trainers"] == {} and info["strategies"] == {}
    assert info["scoring"] == {} and info["train_stats"] == {}
    assert set(info["datastore"]) == {"total", "completed", "label_tags"}
    assert info["name"]


def test_upload_save_download_and_listing(client: MONAILabelClient, tmp_path: Path) -> None:
    image = write(tmp_path / "scan_a.nii.gz", nifti_bytes(seed=1))
    label = write(tmp_path / "scan_a_seg.nii.gz", nifti_bytes(seed=2, dtype="uint8"))
    before = client.info()["datastore"]

    assert client.upload_image(image, "client_a", {"origin": "test"}) == {"image": "client_a"}
    saved = client.save_label("client_a", label, params={"label_info": [{"name": "spleen", "idx": 1}]})
    assert saved == {"image": "client_a", "label": "client_a"}
    client.save_label("client_a", label, tag="original")

    after = client.info()["datastore"]
    assert after["total"] == before["total"] + 1
    assert after["completed"] == before["completed"] + 1
    assert after["label_tags"]["original"] >= 1

    everything = client.datastore()
    assert everything["name"] and everything["labels_dir"] == "labels"
    entry = everything["objects"]["client_a"]
    assert entry["image"]["ext"] == ".nii.gz"
    assert entry["image"]["info"]["origin"] == "test" and entry["image"]["info"]["client_id"] == "tester"
    assert entry["image"]["info"]["name"] == "client_a.nii.gz" and isinstance(entry["image"]["info"]["ts"], int)
    final = entry["labels"]["final"]["info"]
    assert final["label_info"] == [{"name": "spleen", "idx": 1}]
    assert set(entry["labels"]) == {"final", "original"}

    downloaded = client.download_label("client_a", "final")
    assert downloaded.endswith(".nii.gz")
    assert Path(downloaded).read_bytes() == Path(label).read_bytes()


def test_errors_raise_client_exceptions(client: MONAILabelClient, tmp_path: Path) -> None:
    with pytest.raises(MONAILabelClientException):
        client.download_label("no_such_image", "final")
    text = write(tmp_path / "notes.nii.gz", b"this is not a volume at all")
    with pytest.raises(MONAILabelClientException):
        client.upload_image(text, "garbage")
    with pytest.raises(MONAILabelClientException):
        client.save_label("no_such_image", write(tmp_path / "l.nii.gz", nifti_bytes(seed=3)))


def test_sessions(client: MONAILabelClient, tmp_path: Path) -> None:
    total = client.info()["datastore"]["total"]
    listed = set(client.datastore()["objects"])
    created = client.create_session(write(tmp_path / "local.nii.gz", nifti_bytes(seed=4)))
    session_id = created["session_id"]
    info = created["session_info"]
    assert info["name"] == session_id and info["expiry"] == 3600
    assert "/" not in info["image"]  # no server paths
    assert client.get_session(session_id)["name"] == session_id
    # Sessions do not show up as datastore images.
    assert client.info()["datastore"]["total"] == total
    assert set(client.datastore()["objects"]) == listed
    assert client.remove_session(session_id)["name"] == session_id
    with pytest.raises(MONAILabelClientException) as caught:
        client.get_session(session_id)
    assert "404" in str(caught.value)


def test_training_without_its_service_is_a_clear_503(client: MONAILabelClient) -> None:
    # This stack runs no training service: the client gets a 503 that says so, not a 500.
    with pytest.raises(MONAILabelClientException) as caught:
        client.train_start("segmentation", {})
    assert "503" in str(caught.value) and "training" in str(caught.value).lower()
    assert client.train_status(check_if_running=True) is False


def test_active_learning_without_its_service_is_a_clear_503(client: MONAILabelClient) -> None:
    # No active learning service in this stack either: next sample says which service is down.
    with pytest.raises(MONAILabelClientException) as caught:
        client.next_sample("first", {})
    assert "503" in str(caught.value) and "active learning service is not reachable" in str(caught.value)
