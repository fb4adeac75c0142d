"""A MONAI Label studies folder opens in labelgrid as it is, and MONAI Label opens it after us.

Both directions use MONAI Label 0.8.5's own LocalDatastore (installed by `make test`), not
a copy of its format.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from monailabel.datastore.local import LocalDatastore  # MONAI Label 0.8.5, a test dependency

from services.common.chunks import SpoolWriter
from services.datastore.app import build_datastore
from services.datastore.settings import DatastoreSettings
from tests.contract.helpers import nifti_bytes

pytestmark = pytest.mark.timeout(180)


def spool(datastore, data: bytes):
    writer = SpoolWriter(datastore.blobs.spool_dir(), max_bytes=datastore.max_upload_bytes)
    writer.write(data)
    return writer.finish(hashlib.sha256(data).hexdigest())


def open_monailabel(root: Path):
    return LocalDatastore(str(root), auto_reload=False)


def test_monailabel_folder_opens_as_it_is(tmp_path: Path):
    root = tmp_path / "studies"
    root.mkdir()
    for number in range(3):
        (root / f"case_{number}.nii.gz").write_bytes(nifti_bytes(seed=number))
    theirs = open_monailabel(root)
    label = tmp_path / "label.nii.gz"
    label.write_bytes(nifti_bytes(dtype="uint8"))
    theirs.save_label("case_1", str(label), "final", {"label_info": [{"name": "spleen", "idx": 1}]})
    theirs.update_image_info("case_2", {"epistemic_entropy": 0.75, "client_id": "user-xyz"})

    ours = build_datastore(DatastoreSettings(root=root))
    try:
        assert ours.status().total == 3 and ours.status().completed == 1
        assert ours.get_image("case_2").info["epistemic_entropy"] == 0.75
        assert ours.get_label("case_1", "final").info["label_info"] == [{"name": "spleen", "idx": 1}]
        assert ours.get_image("case_0").sha256 == hashlib.sha256(nifti_bytes(seed=0)).hexdigest()
    finally:
        ours.close()


def test_monailabel_opens_the_folder_after_labelgrid_wrote_it(tmp_path: Path):
    root = tmp_path / "studies"
    ours = build_datastore(DatastoreSettings(root=root))
    try:
        ours.add_image(
            spool(ours, nifti_bytes(seed=1)), image_id="img_a", file_name="a.nii.gz", info={"client_id": "x"}
        )
        ours.add_image(spool(ours, nifti_bytes(seed=2)), image_id="img_b", file_name="b.nii.gz", info={})
        ours.add_label(
            spool(ours, nifti_bytes(dtype="uint8")),
            image_id="img_a",
            tag="final",
            file_name="l.nii.gz",
            info={"label_info": [{"name": "liver", "idx": 1}]},
        )
        ours.add_label(
            spool(ours, nifti_bytes(dtype="uint8")), image_id="img_b", tag="reviewer1", file_name="l.nii.gz", info={}
        )
        ours.update_image_info("img_b", {"epistemic_entropy": 0.5})
    finally:
        ours.close()  # flushes MONAI Label's datastore_v2.json

    model = json.loads((root / "datastore_v2.json").read_text())
    assert set(model) >= {"name", "description", "images_dir", "labels_dir", "objects"}

    theirs = open_monailabel(root)
    assert sorted(theirs.list_images()) == ["img_a", "img_b"]
    assert theirs.get_labeled_images() == ["img_a"]
    assert theirs.get_labels_by_image_id("img_b") == {"reviewer1": "img_b"}
    assert theirs.get_image_info("img_a")["client_id"] == "x"
    assert theirs.get_image_info("img_b")["epistemic_entropy"] == 0.5
    assert theirs.get_label_info("img_a", "final")["label_info"] == [{"name": "liver", "idx": 1}]
    assert Path(theirs.get_image_uri("img_a")).read_bytes() == nifti_bytes(seed=1)
    assert theirs.status()["completed"] == 1
