"""fsck finds every kind of damage a killed datastore (or a person) can leave, and --repair fixes the safe ones.

Real stores: a local studies folder and a SeaweedFS bucket, each over SQLite and PostgreSQL.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.datastore import fsck
from services.datastore.app import build_datastore
from services.datastore.domain.datastore import Datastore
from services.datastore.sample_studies import write_sample_studies
from services.datastore.settings import DatastoreSettings

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=["local-sqlite", "local-postgres", "s3-sqlite", "s3-postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> DatastoreSettings:
    blob_backend, index_backend = request.param.split("-")
    values: dict = {
        "backend": blob_backend,
        "root": tmp_path / "studies",
        "state_dir": tmp_path / "state",
    }
    if blob_backend == "s3":
        values.update(request.getfixturevalue("seaweedfs").datastore_settings())
    if index_backend == "postgres":
        values["index"] = request.getfixturevalue("postgres_url")
    return DatastoreSettings(**values)


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    folder = tmp_path / "samples"
    write_sample_studies(folder, count=4, labeled=2, size=12)
    return folder


@pytest.fixture
def datastore(settings: DatastoreSettings, samples: Path, tmp_path: Path) -> Iterator[Datastore]:
    store = build_datastore(settings)
    try:
        for name in ("sample_00.nii.gz", "sample_01.nii.gz", "sample_02.nii.gz"):
            _put(store, f"images/{name}", (samples / name).read_bytes(), tmp_path)
        _put(
            store,
            "labels/final/sample_00.nii.gz",
            (samples / "labels/final/sample_00.nii.gz").read_bytes(),
            tmp_path,
        )
        _put(
            store,
            "labels/final/sample_01.nii.gz",
            (samples / "labels/final/sample_01.nii.gz").read_bytes(),
            tmp_path,
        )
        _put(store, "models/seg/1/model.pt", b"weights-v1", tmp_path)
        store.reindex()
        yield store
    finally:
        store.close()


def _put(store: Datastore, key: str, data: bytes, tmp_path: Path) -> None:
    source = tmp_path / "put.bin"
    source.write_bytes(data)
    store.blobs.put_file(key, source, sha256=hashlib.sha256(data).hexdigest())


def _kinds(report: fsck.FsckReport) -> list[tuple[str, str]]:
    return sorted((p.kind, p.subject) for p in report.problems)


def test_a_consistent_store_is_clean_also_with_checksums(datastore: Datastore):
    report = fsck.check(datastore, checksums=True)
    assert report.clean, list(report.lines())
    assert report.checked == {"index rows": 6, "blobs": 6}
    assert list(report.lines())[-1] == "fsck: clean (checked 6 index rows, 6 blobs)"


def test_every_kind_of_damage_is_reported_and_repair_fixes_the_safe_ones(
    datastore: Datastore, samples: Path, tmp_path: Path
):
    blobs, index = datastore.blobs, datastore.index
    # A blob gone under its row, a blob without a row, a blob that changed size, a model row without bytes.
    assert blobs.delete("images/sample_02.nii.gz")
    _put(
        datastore,
        "images/sample_03.nii.gz",
        (samples / "sample_03.nii.gz").read_bytes(),
        tmp_path,
    )
    # Still a valid label (reindex adopts only files that pass the upload check), other bytes.
    changed_label = gzip.compress(gzip.decompress((samples / "labels/final/sample_01.nii.gz").read_bytes()), 0)
    _put(datastore, "labels/final/sample_01.nii.gz", changed_label, tmp_path)
    index.add_model_version("seg", "2", "model.pt", "0" * 64, 10, {}, {})
    # A killed upload's spool (old) next to a live one (fresh), and a lease that ran out.
    spool = Path(blobs.spool_dir())
    dead = spool / "upload-dead.part"
    dead.write_bytes(b"half a volume")
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    got = datastore.acquire_lease("client-a", "first", ttl_seconds=1)
    assert not isinstance(got, str)
    later = time.time() + 60  # fsck looks a minute ahead: the lease ran out, the multipart upload is a minute old
    live = spool / "upload-live.part"
    live.write_bytes(b"arriving")
    os.utime(live, (later - 1, later - 1))
    if datastore.backend == "s3":
        # A multipart upload a killed process never completed nor aborted.
        client = blobs._client
        upload_id = client._create_multipart_upload(blobs.bucket, blobs.prefix + "images/sample_09.nii.gz", {})
        client._upload_part(
            blobs.bucket,
            blobs.prefix + "images/sample_09.nii.gz",
            b"x" * (5 * 2**20),
            None,
            upload_id,
            1,
        )

    report = fsck.check(datastore, now=lambda: later, min_age_seconds=30)
    expected = [
        ("half-written-spool", str(dead)),
        ("missing-blob", "images/sample_02.nii.gz"),
        ("missing-blob", "models/seg/2/model.pt"),
        ("size-mismatch", "labels/final/sample_01.nii.gz"),
        ("stale-lease", got[0].image_id),
        ("unindexed-blob", "images/sample_03.nii.gz"),
    ]
    if datastore.backend == "s3":
        expected = sorted([*expected, ("orphan-multipart", blobs.prefix + "images/sample_09.nii.gz")])
    assert _kinds(report) == expected, list(report.lines())
    assert report.in_flight == 1  # the live spool is not touched, nor reported
    lines = list(report.lines())
    assert lines[-1].startswith(f"fsck: {len(expected)} problems")

    repaired = fsck.repair(datastore, now=lambda: later, min_age_seconds=30)
    assert repaired.clean, list(repaired.lines())
    assert any("re-indexed" in line for line in repaired.repairs) and any(str(dead) in r for r in repaired.repairs)
    assert not dead.exists() and live.exists()
    # The adopted image is served, the one whose bytes vanished is gone, the changed label re-hashed.
    assert datastore.get_image("sample_03").size == (samples / "sample_03.nii.gz").stat().st_size
    assert {i.image_id for i in fsck._all_images(index)} == {
        "sample_00",
        "sample_01",
        "sample_03",
    }
    label = datastore.get_label("sample_01", "final")
    assert label.sha256 == hashlib.sha256(changed_label).hexdigest()
    assert ("seg", "2") not in fsck._all_model_versions(index)
    if datastore.backend == "s3":
        assert not list(fsck._multipart_uploads(blobs))


def test_a_changed_byte_is_found_only_with_checksums_and_never_repaired(datastore: Datastore, tmp_path: Path):
    original = b"".join(datastore.blobs.open_read("images/sample_00.nii.gz"))
    flipped = bytes([original[0] ^ 0xFF]) + original[1:]
    _put(datastore, "images/sample_00.nii.gz", flipped, tmp_path)
    assert fsck.check(datastore).clean
    report = fsck.check(datastore, checksums=True)
    assert _kinds(report) == [("checksum-mismatch", "images/sample_00.nii.gz")]
    after = fsck.repair(datastore, checksums=True)
    assert _kinds(after) == [("checksum-mismatch", "images/sample_00.nii.gz")] and not after.repairs


def test_the_cli_exit_code_says_clean_or_not(tmp_path: Path):
    root = tmp_path / "studies"
    write_sample_studies(root, count=2, labeled=1, size=12)
    run = [sys.executable, "-m", "services.datastore", "fsck", "--root", str(root)]
    first = subprocess.run([*run, "--checksums"], check=False, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "fsck: clean" in first.stdout
    shutil.copy(root / "sample_00.nii.gz", root / "sample_07.nii.gz")
    (root / "sample_01.nii.gz").unlink()
    found = subprocess.run(run, check=False, capture_output=True, text=True, timeout=120)
    assert found.returncode == 1
    assert "unindexed-blob: images/sample_07.nii.gz" in found.stdout
    assert "missing-blob: images/sample_01.nii.gz" in found.stdout
    fixed = subprocess.run([*run, "--repair"], check=False, capture_output=True, text=True, timeout=120)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "repaired: re-indexed" in fixed.stdout and "fsck: clean" in fixed.stdout
    again = subprocess.run(run, check=False, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "fsck: clean" in again.stdout
