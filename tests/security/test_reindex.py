"""Reindex adopts a file only after the upload's format check: hostile files placed straight into
the store (a copied MONAI Label folder, a bucket written by someone else) are skipped and
reported, left where they are, and never indexed; good files beside them are adopted."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.datastore.app import build_datastore
from services.datastore.domain import formats
from services.datastore.domain.datastore import Datastore, image_key, label_key
from services.datastore.settings import DatastoreSettings
from tests.fixtures.hostile import nifti
from tests.security import hostile

pytestmark = pytest.mark.timeout(300)

# The indirection and bomb classes (the DICOM zips are covered at upload; they cost seconds each).
CASES = [name for name in hostile.VOLUME_CASES if not name.startswith("nrrd-bzip2")]


@pytest.fixture
def datastore(tmp_path: Path) -> Iterator[Datastore]:
    settings = DatastoreSettings(
        backend="local", root=tmp_path / "studies", state_dir=tmp_path / "state", port=0, metrics_port=-1
    )
    store = build_datastore(settings)
    yield store
    store.close()


def _place(store: Datastore, key: str, data: bytes, spool: Path) -> None:
    """Writes a blob as a folder copy would: no check on the way."""
    source = spool / hashlib.sha256(key.encode()).hexdigest()
    source.write_bytes(data)
    store.blobs.put_file(key, source, sha256=hashlib.sha256(data).hexdigest())


def test_reindex_skips_and_reports_files_that_fail_the_format_check(datastore: Datastore, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"s" * 64)
    spool = tmp_path / "placing"
    spool.mkdir()
    bad_keys = []
    for index, case in enumerate(CASES):
        name, data = hostile.build(case, str(secret), str(tmp_path / "missing"))
        try:
            ext = formats.image_ext_from_name(name)
        except InvalidArgument:
            continue  # a name no store key can have (.mhd, .hdr): never adopted whatever it holds
        key = image_key(f"bad-{index}{ext}")
        _place(datastore, key, data, spool)
        bad_keys.append(key)
    assert len(bad_keys) >= 12, bad_keys
    _place(datastore, image_key("good.nii.gz"), nifti(), spool)
    _place(datastore, label_key("final", "good.nrrd"), hostile.build("nrrd-data-file", str(secret), "/m")[1], spool)
    _place(datastore, image_key("good2.nii.gz"), nifti(), spool)
    _place(datastore, label_key("final", "good2.nii.gz"), nifti(), spool)

    counts = datastore.reindex()

    indexed = {image.image_id: set(image.labels) for image in datastore.list_images(page_size=1000).items}
    assert indexed == {"good": set(), "good2": {"final"}}, indexed
    reported = {line.split(": ", 1)[0] for line in counts.skipped}
    assert reported == {*bad_keys, label_key("final", "good.nrrd")}, sorted(reported)
    assert all(str(secret) not in line and str(tmp_path) not in line for line in counts.skipped)
    # Left where they were (the operator decides), and still not adopted by a second run.
    assert all(datastore.blobs.exists(key) for key in bad_keys)
    assert {line.split(": ", 1)[0] for line in datastore.reindex().skipped} == reported
    assert len(datastore.list_images(page_size=1000).items) == 2
    # Nothing of the checks is left in the spool folder.
    assert not [entry for entry in Path(datastore.blobs.spool_dir()).iterdir() if entry.name.startswith("reindex-")]
