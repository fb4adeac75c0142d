"""The hot read paths of the index on both backends: GET /datastore/?output=all as one
serialised export, and the counts, with the gateway's session images left out."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from services.datastore.adapters.index import ImageImport, LabelImport, SqlIndex

SHA = "a" * 64
HIDE = {"hidden_id_prefix": "session-", "hidden_info_key": "session"}


@pytest.fixture
def index(index_url: str) -> Iterator[SqlIndex]:
    ix = SqlIndex(index_url)
    yield ix
    ix.close()


def fill(ix: SqlIndex) -> None:
    ix.bulk_import(
        [
            ImageImport("b_img", ".nii.gz", SHA, 10, {"name": "b_img.nii.gz", "ts": 5, "é": "ü", "x": [1, 2.5, None]}),
            ImageImport("a_img", ".nrrd", SHA, 10, {}),  # no ts / name: filled in, as MONAI Label always has them
            ImageImport("session-1", ".nii.gz", SHA, 10, {"session": True}),
            ImageImport("session-2", ".nii.gz", SHA, 10, {"session": "yes"}),  # not a session: the flag must be true
            ImageImport("session-3", ".nii.gz", SHA, 10, {}),
        ],
        [
            LabelImport("b_img", "zeta", ".nii.gz", SHA, 3, {"z": 1}),
            LabelImport("b_img", "final", ".nrrd", SHA, 3, {"label_info": [{"name": "spleen", "idx": 1}]}),
            LabelImport("session-1", "final", ".nii.gz", SHA, 3, {}),
        ],
        now=1_800_000_000.5,
    )


def test_export_json_is_the_monailabel_model_serialised(index: SqlIndex) -> None:
    fill(index)
    body = index.export_monailabel_json("ds", "Dataset")
    model = index.export_monailabel_model("ds", "Dataset")
    assert json.loads(body) == model
    assert list(json.loads(body)["objects"]) == sorted(model["objects"])  # id order
    assert list(json.loads(body)["objects"]["b_img"]["labels"]) == ["final", "zeta"]
    assert json.loads(body)["objects"]["a_img"]["image"]["info"] == {"ts": 1_800_000_000, "name": "a_img.nrrd"}
    # FastAPI's way of writing JSON (MONAI Label's answers): compact separators.
    assert body.startswith(
        b'{"name":"ds","description":"Dataset","images_dir":".","labels_dir":"labels","objects":{"a_img":'
    )
    assert b'": ' not in body and b'", "' not in body


def test_export_json_and_status_leave_out_session_images(index: SqlIndex) -> None:
    fill(index)
    objects = json.loads(index.export_monailabel_json(**HIDE))["objects"]
    assert sorted(objects) == ["a_img", "b_img", "session-2", "session-3"]
    status = index.status(**HIDE)
    assert (status.total, status.completed, status.label_tags) == (4, 1, {"final": 1, "zeta": 1})
    everything = index.status()
    assert (everything.total, everything.completed, everything.label_tags) == (5, 2, {"final": 2, "zeta": 1})
    assert sorted(json.loads(index.export_monailabel_json())["objects"]) == [
        "a_img", "b_img", "session-1", "session-2", "session-3"
    ]  # fmt: skip


def test_export_json_of_an_empty_index(index: SqlIndex) -> None:
    assert json.loads(index.export_monailabel_json(**HIDE))["objects"] == {}
    assert index.status(**HIDE).total == 0


def test_every_write_shows_in_the_next_export_and_count(index: SqlIndex) -> None:
    # SQLite serves these two from a cache kept until the next write: each write must show.
    def snapshot() -> tuple[dict, int, dict]:
        status = index.status(**HIDE)
        return json.loads(index.export_monailabel_json(**HIDE))["objects"], status.total, status.label_tags

    fill(index)
    objects, total, tags = snapshot()
    assert snapshot() == (objects, total, tags)  # a read changes nothing
    index.upsert_image("c_img", ".nii.gz", SHA, 1, {"k": 1})
    objects, total, _ = snapshot()
    assert objects["c_img"]["image"]["info"]["k"] == 1 and total == 5
    index.update_image_info("c_img", {"k": 2})
    assert snapshot()[0]["c_img"]["image"]["info"]["k"] == 2
    index.upsert_label("c_img", "final", ".nii.gz", SHA, 1, {"l": 1})
    objects, _, tags = snapshot()
    assert objects["c_img"]["labels"]["final"]["info"]["l"] == 1 and tags["final"] == 2
    index.update_label_info("c_img", "final", {"l": 2})
    assert snapshot()[0]["c_img"]["labels"]["final"]["info"]["l"] == 2
    index.delete_label("c_img", "final")
    assert snapshot()[2]["final"] == 1
    index.update_image_info("session-3", {"session": True})
    assert "session-3" not in snapshot()[0]
    index.delete_image("c_img")
    objects, total, _ = snapshot()
    assert "c_img" not in objects and total == 3


def test_the_cache_is_peeked_only_while_nothing_changed(index: SqlIndex) -> None:
    fill(index)
    status, body = index.status(**HIDE), index.export_monailabel_json(**HIDE)
    if index.backend == "postgresql":  # other replicas may write: never cached
        assert index.status_if_cached(**HIDE) is None and index.export_monailabel_json_if_cached(**HIDE) is None
        return
    assert index.status_if_cached(**HIDE) == status and index.export_monailabel_json_if_cached(**HIDE) == body
    assert index.status_if_cached() is None  # another key: not computed yet
    index.update_image_info("a_img", {"k": 1})
    assert index.status_if_cached(**HIDE) is None and index.export_monailabel_json_if_cached(**HIDE) is None
