"""The DICOMweb datastore against a real Orthanc: series listed by QIDO and mirrored into the
index (leases work on them), fetched by WADO once and fetched again when the PACS's copy
changes, final labels written back as DICOM SEG, SEGs in the PACS counted as labels, a PACS
that is down answered UNAVAILABLE. (Through the gateway: test_dicomweb_gateway.py.)"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest

from services.common.chunks import SpooledFile, sha256_file
from services.common.errors import NotFound, Unavailable
from services.datastore.adapters.dicomweb_store import (
    CACHED_KEY,
    CONTENT_KEY,
    SEG_KEY,
    SUPERSEDED_KEY,
    PacsDatastore,
)
from services.datastore.app import build_datastore
from services.datastore.domain.model import ImageFilter
from services.datastore.settings import DatastoreSettings
from tests.fixtures.orthanc import Orthanc, ct_series, run_orthanc
from tests.fixtures.polling import wait_until
from tests.ports import free_port


def pacs_settings(orthanc_url: str, state_dir: Path, patient_id: str, **extra: Any) -> DatastoreSettings:
    return DatastoreSettings(
        port=0,
        metrics_port=-1,
        backend="dicomweb",
        dicomweb_url=orthanc_url,
        dicomweb_search_filter=json.dumps({"Modality": "CT", "PatientID": patient_id}),
        dicomweb_sync_seconds=0,
        state_dir=state_dir,
        **extra,
    )


# -- the datastore itself: cache invalidation, SEGs made elsewhere, leases, a PACS down ----------


def test_a_change_in_the_pacs_refetches_and_segs_count_as_labels(orthanc: Orthanc, tmp_path: Path) -> None:
    patient = f"DSD-{uuid.uuid4().hex[:8]}"
    series = ct_series(slices=5, seed=21, patient_id=patient)
    other = ct_series(slices=3, seed=22, patient_id=patient)
    orthanc.upload(series.datasets[:4] + other.datasets)
    store = build_datastore(pacs_settings(orthanc.dicomweb_url, tmp_path / "a", patient))
    try:
        assert isinstance(store, PacsDatastore)
        wait_until(lambda: store.status().total == 2)
        listed = {image.image_id: image for image in store.list_images().items}
        assert {i.size for i in listed.values()} == {0}  # listed, nothing fetched yet
        first = store.get_image(series.series_uid)  # asked for: fetched and converted now
        assert first.size > 0 and first.info[CACHED_KEY] == first.info[CONTENT_KEY]
        assert store.get_image(series.series_uid).update_time == first.update_time  # the cache answers
        assert store.sync()["unchanged"] == 2
        # Next sample over PACS series: both unlabeled, leased one after the other.
        leased = {store.acquire_lease("c1", "random")[0].image_id, store.acquire_lease("c2", "random")[0].image_id}
        assert leased == {series.series_uid, other.series_uid}

        orthanc.upload(series.datasets[4:])  # the PACS's copy changes: one more slice
        assert store.sync()["listed"] == 1
        changed = store.get_image(series.series_uid)  # stale: fetched again
        assert changed.sha256 != first.sha256
        assert store.get_image(series.series_uid).sha256 == changed.sha256

        # A final label saved here goes to the PACS as SEG ...
        path = tmp_path / "label.nii.gz"
        image_path = tmp_path / "image.nii.gz"
        image_path.write_bytes(b"".join(store.read_image(other.series_uid).chunks))
        image = nib.load(image_path)
        label = (np.asarray(image.dataobj) > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(label, image.affine), path)
        store.add_label(
            SpooledFile(path, path.stat().st_size, sha256_file(path)),
            image_id=other.series_uid, tag="final", file_name="label.nii.gz", info={},
        )  # fmt: skip
    finally:
        store.close()
    # ... and a fresh datastore on the same PACS counts that series as labeled, on the same voxels.
    fresh = build_datastore(pacs_settings(orthanc.dicomweb_url, tmp_path / "b", patient))
    try:
        labeled = wait_until(lambda: list(fresh.list_images(filter=ImageFilter.LABELED).items))
        assert [i.image_id for i in labeled] == [other.series_uid]
        back = tmp_path / "back.nii.gz"
        back.write_bytes(b"".join(fresh.read_label(other.series_uid, "final").chunks))
        assert np.array_equal(np.asarray(nib.load(back).dataobj), label)
        assert fresh.status().total == 2
    finally:
        fresh.close()


def test_a_pacs_that_is_down_is_unavailable_and_nothing_is_listed(tmp_path: Path) -> None:
    store = build_datastore(
        pacs_settings(f"http://127.0.0.1:{free_port()}/dicom-web", tmp_path, "nobody", dicomweb_timeout_seconds=2)
    )
    try:
        with pytest.raises(Unavailable, match="unavailable"):
            store.get_image("1.2.3.4")
        with pytest.raises(Unavailable):
            store.sync()
        assert store.status().total == 0
    finally:
        store.close()


def test_an_unknown_series_is_not_found(orthanc: Orthanc, tmp_path: Path) -> None:
    store = build_datastore(pacs_settings(orthanc.dicomweb_url, tmp_path, "nobody"))
    try:
        with pytest.raises(NotFound):
            store.get_image("1.2.3.4.5.6.7")
    finally:
        store.close()


def test_a_final_label_the_pacs_cannot_take_is_not_stored(tmp_path: Path) -> None:
    """The PACS goes away after the series was cached: saving a final label is UNAVAILABLE and
    stores nothing (the SEG goes first); other tags still save, the cache still serves."""
    series = ct_series(slices=3, seed=51, patient_id="GONE")
    with run_orthanc(tmp_path / "orthanc") as own:
        own.upload(series.datasets)
        store = build_datastore(pacs_settings(own.dicomweb_url, tmp_path / "state", "GONE", dicomweb_timeout_seconds=2))
        wait_until(lambda: store.status().total == 1)
        store.get_image(series.series_uid)  # used once while the PACS was there: cached
    try:  # Orthanc is stopped now
        image_path = tmp_path / "image.nii.gz"
        image_path.write_bytes(b"".join(store.read_image(series.series_uid).chunks))
        image = nib.load(image_path)
        label_path = tmp_path / "label.nii.gz"
        nib.save(nib.Nifti1Image((np.asarray(image.dataobj) > 0).astype(np.uint8), image.affine), label_path)

        def spooled() -> SpooledFile:
            copy = tmp_path / f"upload-{uuid.uuid4().hex}"
            copy.write_bytes(label_path.read_bytes())
            return SpooledFile(copy, copy.stat().st_size, sha256_file(copy))

        with pytest.raises(Unavailable, match="unavailable"):
            store.add_label(spooled(), image_id=series.series_uid, tag="final", file_name="label.nii.gz", info={})
        with pytest.raises(NotFound):
            store.get_label(series.series_uid, "final")
        store.add_label(spooled(), image_id=series.series_uid, tag="original", file_name="label.nii.gz", info={})
        assert store.get_label(series.series_uid, "original").size > 0
    finally:
        store.close()


def test_replicas_sharing_the_index_each_cache_the_same_bytes(orthanc: Orthanc, tmp_path: Path) -> None:
    """Two datastore replicas on one index, each with its own cache: the second converts its own
    copy when asked, byte for byte the first one's (the index's sha256 stays true for both)."""
    patient = f"DSR-{uuid.uuid4().hex[:8]}"
    series = ct_series(slices=3, seed=61, patient_id=patient)
    orthanc.upload(series.datasets)
    index = f"sqlite:///{tmp_path / 'shared-index.db'}"
    one = build_datastore(pacs_settings(orthanc.dicomweb_url, tmp_path / "one", patient, index=index))
    try:
        wait_until(lambda: one.status().total == 1)
        # Started after the first one listed the PACS: two first passes at once on one SQLite file
        # once left the image unlisted for a minute (not seen since; PostgreSQL is the shared index).
        two = build_datastore(pacs_settings(orthanc.dicomweb_url, tmp_path / "two", patient, index=index))
        try:
            cached = one.get_image(series.series_uid)
            read_one = one.read_image(series.series_uid)
            read_two = two.read_image(series.series_uid)  # not in two's cache: converted there now
            bytes_one, bytes_two = b"".join(read_one.chunks), b"".join(read_two.chunks)
            assert bytes_one == bytes_two
            assert read_two.sha256 == cached.sha256 == hashlib.sha256(bytes_two).hexdigest()
        finally:
            two.close()
    finally:
        one.close()


def test_a_deleted_final_label_keeps_its_seg_superseded_and_removed_series_leave_the_index(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """DICOMweb has no delete: a deleted final label's SEG stays in the PACS, marked superseded in
    the index, so a restarted datastore does not bring the label back. A series deleted from the
    PACS leaves the index (labels and cache too) on the next sync."""
    patient = f"DSX-{uuid.uuid4().hex[:8]}"
    kept, removed = ct_series(slices=3, seed=61, patient_id=patient), ct_series(slices=3, seed=62, patient_id=patient)
    orthanc.upload(kept.datasets + removed.datasets)
    settings = pacs_settings(orthanc.dicomweb_url, tmp_path / "state", patient)
    store = build_datastore(settings)
    try:
        wait_until(lambda: store.status().total == 2)
        image_path = tmp_path / "image.nii.gz"
        image_path.write_bytes(b"".join(store.read_image(kept.series_uid).chunks))
        image = nib.load(image_path)
        label_path = tmp_path / "label.nii.gz"
        nib.save(nib.Nifti1Image((np.asarray(image.dataobj) > 0).astype(np.uint8), image.affine), label_path)
        segs_before = orthanc.series_uids("SEG")
        label = store.add_label(
            SpooledFile(label_path, label_path.stat().st_size, sha256_file(label_path)),
            image_id=kept.series_uid, tag="final", file_name="label.nii.gz", info={},
        )  # fmt: skip
        seg_uid = label.info[SEG_KEY]
        assert orthanc.series_uids("SEG") - segs_before == {seg_uid}
        store.delete_label(kept.series_uid, "final")
        with pytest.raises(NotFound):
            store.get_label(kept.series_uid, "final")
        assert seg_uid in orthanc.series_uids("SEG")  # kept in the PACS ...
        assert store.get_image(kept.series_uid).info[SUPERSEDED_KEY] == [seg_uid]  # ... superseded
        store.get_image(removed.series_uid)  # cached, so removing it also drops bytes
    finally:
        store.close()

    # Orthanc's own REST API (not DICOMweb) deletes a series behind labelgrid's back.
    (found,) = httpx.post(f"{orthanc.url}/tools/lookup", content=removed.series_uid, timeout=30).json()
    httpx.delete(f"{orthanc.url}/series/{found['ID']}", timeout=30).raise_for_status()

    restarted = build_datastore(settings)  # the same index: a restart
    try:
        # Its first pass runs at open; this one waits for it (one pass at a time), so after it
        # every SEG in the PACS has been considered for import.
        wait_until(lambda: restarted.status().total == 1)
        assert restarted.sync()["segs"] == 0
        assert [i.image_id for i in restarted.list_images().items] == [kept.series_uid]
        with pytest.raises(NotFound):
            restarted.get_label(kept.series_uid, "final")  # the superseded SEG was not imported
        with pytest.raises(NotFound):
            restarted.get_image(removed.series_uid)
    finally:
        restarted.close()
