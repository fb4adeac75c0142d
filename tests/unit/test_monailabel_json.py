"""MONAI Label 0.8.5 datastore_v2.json: read, atomic write under MONAI Label's lock, mirror."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import filelock
import pytest

from services.datastore.adapters.index import SqlIndex
from services.datastore.adapters.monailabel_json import (
    DATASTORE_FILE,
    JsonMirror,
    empty_model,
    read_monailabel_json,
    write_monailabel_json,
)
from tests.fixtures.polling import wait_until

# As MONAI Label 0.8.5 writes it (pydantic LocalDatastoreModel.json(indent=2)), with a
# base_path left over from an older version and a few broken entries a hand edit could leave.
MONAILABEL_FILE = """{
  "name": "new-dataset",
  "description": "New Dataset",
  "images_dir": ".",
  "labels_dir": "labels",
  "base_path": "/old/studies",
  "objects": {
    "img_02": {
      "image": {"ext": ".nii.gz", "info": {"ts": 1795395151, "name": "img_02.nii.gz", "epistemic_entropy": 0.6327}},
      "labels": {}
    },
    "up_a": {
      "image": {"ext": ".nii.gz",
                "info": {"client_id": "cap", "user": "admin", "ts": 1795395280, "name": "up_a.nii.gz"}},
      "labels": {
        "final": {"ext": ".nii.gz", "info": {"label_info": [{"name": "spleen", "idx": 1}], "client_id": "cap",
                  "ts": 1795395281, "name": "up_a.nii.gz"}},
        "reviewer1": {"ext": ".nii.gz", "info": {"ts": 1795395281, "name": "up_a.nii.gz"}},
        "broken": "not an object"
      }
    },
    "no_info": {"image": {"ext": ".nrrd"}},
    "bad_image": {"image": {"ext": 5, "info": {}}},
    "not_an_object": 7
  }
}"""


def test_reads_a_monailabel_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / DATASTORE_FILE).write_text(MONAILABEL_FILE)
    with caplog.at_level(logging.WARNING):
        model = read_monailabel_json(tmp_path)
    assert model is not None
    assert set(model) == {"name", "description", "images_dir", "labels_dir", "objects"}  # base_path dropped
    assert list(model["objects"]) == ["img_02", "up_a", "no_info"]
    up_a = model["objects"]["up_a"]
    assert up_a["image"]["info"]["client_id"] == "cap"
    assert set(up_a["labels"]) == {"final", "reviewer1"}
    assert up_a["labels"]["final"]["info"]["label_info"] == [{"name": "spleen", "idx": 1}]
    assert model["objects"]["no_info"] == {"image": {"ext": ".nrrd", "info": {}}, "labels": {}}
    assert "bad_image" in caplog.text and "not_an_object" in caplog.text


def test_missing_or_invalid_file_is_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert read_monailabel_json(tmp_path) is None
    (tmp_path / DATASTORE_FILE).write_text('{"objects": {')  # a half-written file
    with caplog.at_level(logging.WARNING):
        assert read_monailabel_json(tmp_path) is None
    assert "not valid JSON" in caplog.text
    (tmp_path / DATASTORE_FILE).write_text("[1, 2]")
    assert read_monailabel_json(tmp_path) is None
    (tmp_path / DATASTORE_FILE).write_text("{}")  # MONAI Label's defaults fill in
    assert read_monailabel_json(tmp_path) == empty_model()


def test_round_trip(tmp_path: Path) -> None:
    model = empty_model()
    model["objects"]["a"] = {
        "image": {"ext": ".nii.gz", "info": {"ts": 1, "name": "a.nii.gz", "nested": {"x": [1, 2]}}},
        "labels": {"final": {"ext": ".nrrd", "info": {"ts": 2, "name": "a.nrrd"}}},
    }
    write_monailabel_json(tmp_path, model)
    assert read_monailabel_json(tmp_path) == model
    text = (tmp_path / DATASTORE_FILE).read_text()
    assert text.startswith('{\n  "name": "new-dataset"')  # indent=2, as MONAI Label writes
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_index_export_round_trips_through_the_file(tmp_path: Path) -> None:
    with SqlIndex(f"sqlite:///{tmp_path / 'index.db'}") as ix:
        ix.upsert_image("img_1", ".nii.gz", "a" * 64, 1, {"ts": 5, "name": "img_1.nii.gz", "client_id": "c"})
        ix.upsert_label("img_1", "final", ".nii.gz", "b" * 64, 1, {"ts": 6, "name": "img_1.nii.gz"})
        model = ix.export_monailabel_model()
    studies = tmp_path / "studies"
    studies.mkdir()
    write_monailabel_json(studies, model)
    assert read_monailabel_json(studies) == model
    assert json.loads((studies / DATASTORE_FILE).read_text())["objects"]["img_1"]["labels"]["final"]["ext"] == ".nii.gz"


def test_write_waits_for_monailabel_lock_and_is_atomic(tmp_path: Path) -> None:
    write_monailabel_json(tmp_path, empty_model(name="v0"))
    lock = filelock.FileLock(str(tmp_path / ".lock"))  # what a MONAI Label server holds
    done = threading.Event()

    def writer() -> None:
        write_monailabel_json(tmp_path, empty_model(name="v1"))
        done.set()

    with lock:
        t = threading.Thread(target=writer)
        t.start()
        assert not done.wait(0.3)  # blocked on the lock
        assert json.loads((tmp_path / DATASTORE_FILE).read_text())["name"] == "v0"
    assert done.wait(5)
    t.join()
    assert json.loads((tmp_path / DATASTORE_FILE).read_text())["name"] == "v1"

    # A lock-free reader never sees a half file while a big model is rewritten.
    big = empty_model()
    big["objects"] = {
        f"img_{i:05d}": {"image": {"ext": ".nii.gz", "info": {"ts": i}}, "labels": {}} for i in range(2000)
    }
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                json.loads((tmp_path / DATASTORE_FILE).read_bytes())
            except ValueError as e:
                bad.append(str(e))

    r = threading.Thread(target=reader)
    r.start()
    for i in range(10):
        big["name"] = f"n{i}"
        write_monailabel_json(tmp_path, big)
    stop.set()
    r.join()
    assert bad == []
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_mirror_coalesces_changes(tmp_path: Path) -> None:
    state: dict[str, Any] = {"n": 0, "builds": 0}

    def build() -> dict[str, Any]:
        state["builds"] += 1
        return empty_model(name=f"n{state['n']}")

    mirror = JsonMirror(tmp_path, build, interval=0.2)
    start = time.monotonic()
    while time.monotonic() - start < 0.5:  # a burst of changes for 0.5 s
        state["n"] += 1
        mirror.mark_dirty()
        time.sleep(0.0005)  # paces the burst of changes (the workload), not a wait for anything
    assert state["n"] > 200
    latest = f"n{state['n']}"

    def written() -> str:
        path = tmp_path / DATASTORE_FILE
        return json.loads(path.read_text())["name"] if path.exists() else ""

    # The last coalesced write lands within one interval, and it has the latest state.
    wait_until(lambda: written() == latest, "the latest state in the file", timeout=10, interval=0.01)
    assert 1 <= mirror.writes <= 5, mirror.writes  # a burst of 0.5 s at one write per 0.2 s, not one per change

    state["n"] += 1
    mirror.flush()  # synchronous
    assert json.loads((tmp_path / DATASTORE_FILE).read_text())["name"] == f"n{state['n']}"

    # Nothing dirty: no writes. The next change is written by the thread one interval after flush's
    # write at the earliest, so once it is in the file the thread has been idle a whole interval:
    # exactly one write more proves it wrote nothing while nothing was dirty.
    writes = mirror.writes
    state["n"] += 1
    latest = f"n{state['n']}"
    mirror.mark_dirty()
    wait_until(lambda: mirror.writes > writes and written() == latest, "the next write", timeout=10, interval=0.01)
    assert mirror.writes == writes + 1, (writes, mirror.writes)

    state["n"] += 1
    mirror.mark_dirty()
    mirror.close()  # flushes what is pending
    assert json.loads((tmp_path / DATASTORE_FILE).read_text())["name"] == f"n{state['n']}"
    mirror.mark_dirty()  # after close: ignored
    mirror.close()  # idempotent


def test_mirror_survives_a_failing_build(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls = {"n": 0}

    def build() -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("index unavailable")
        return empty_model(name="ok")

    with caplog.at_level(logging.ERROR), JsonMirror(tmp_path, build, interval=0.05) as mirror:
        mirror.mark_dirty()
        wait_until(lambda: mirror.writes, "a write after the failed build", timeout=10, interval=0.01)
    assert mirror.writes >= 1 and "index unavailable" in caplog.text
    assert json.loads((tmp_path / DATASTORE_FILE).read_text())["name"] == "ok"
