"""The local folder's datastore_v2.json is written from the bytes GET /datastore/?output=all
answers (SqlIndex.export_monailabel_json): the same MONAI Label model, one build per change."""

from __future__ import annotations

import json
from pathlib import Path

from services.datastore.adapters.index import SqlIndex
from services.datastore.adapters.monailabel_json import DATASTORE_FILE, JsonMirror, read_monailabel_json

SHA = "a" * 64


def test_the_mirror_writes_the_export_bytes_as_they_are(tmp_path: Path) -> None:
    index = SqlIndex(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        index.upsert_image("img_1", ".nii.gz", SHA, 1, {"é": "ü"}, now=1_800_000_000)
        index.upsert_label("img_1", "final", ".nii.gz", SHA, 1, {"label_info": [1]}, now=1_800_000_001)
        with JsonMirror(tmp_path, lambda: index.export_monailabel_json("ds", "Dataset"), interval=0.05) as mirror:
            mirror.flush()
            body = (tmp_path / DATASTORE_FILE).read_bytes()
            assert body == index.export_monailabel_json("ds", "Dataset")
            assert json.loads(body) == index.export_monailabel_model("ds", "Dataset")
            index.update_image_info("img_1", {"seen": True})
            mirror.flush()
        model = read_monailabel_json(tmp_path)  # as MONAI Label and a reindex read it
        assert model is not None and model["objects"]["img_1"]["image"]["info"]["seen"] is True
    finally:
        index.close()
