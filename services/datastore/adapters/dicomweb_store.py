"""The datastore over a PACS: images are DICOMweb series, mirrored into the SQL index.

`PacsDatastore` is the plain `Datastore` (blob store + SQL index, so next-sample, leases,
scores and training work unchanged) fed from a `DicomwebPacs`:

- sync (at open, then every `sync_seconds` in a background thread): QIDO lists the series the
  search filter selects and each is indexed with its content key (a hash of its instance UIDs),
  without its bytes. A series is fetched by WADO when someone first asks for it by id
  (inference, training, a label; also a series the filter did not list), converted to a NIfTI
  volume (highdicom: slice order, orientation, spacing) and stored through the normal
  add_image path, so the blob store is the cache, keyed by series and content; a series whose
  content key changed in the PACS is fetched again on its next use.
  SEG series whose source series has no final label become that series' final label: a series
  with a SEG counts as labeled.
- a `final` label saved here is first written back to the PACS as a DICOM SEG by STOW (then
  stored as usual); when the PACS cannot take it the save fails with UNAVAILABLE and nothing is
  stored. Other tags stay in the blob store only.

A PACS that is down makes a sync fail (logged, retried next period) and an on-demand fetch
UNAVAILABLE; the service keeps serving what it already has.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from services.common import raw_labels
from services.common.chunks import SpooledFile, sha256_file
from services.common.dicom_seg import label_to_seg, referenced_series, seg_to_label
from services.common.errors import InvalidArgument, LabelgridError, NotFound
from services.common.formats import label_ext_from_name
from services.common.models.volumes import VolumeFiles
from services.datastore.adapters.dicomweb import (
    DicomwebPacs,
    PacsSeries,
    series_to_nifti,
)
from services.datastore.domain.datastore import Datastore, image_key
from services.datastore.domain.model import DEFAULT_TAG_FINAL, ImageRecord, LabelRecord

log = logging.getLogger(__name__)

CONTENT_KEY = "dicomweb_content"  # image info: the series' content key as last listed
CACHED_KEY = "dicomweb_cached"  # image info: the content key of the cached volume ('' until fetched)
SEG_KEY = "dicomweb_seg_series"  # label info: the SEG series that holds this final label
# image info: SEG series that are no longer this series' final label (deleted or replaced here).
# DICOMweb has no delete, so they stay in the PACS; a sync never imports them again.
SUPERSEDED_KEY = "dicomweb_superseded_segs"


class PacsDatastore(Datastore):
    def __init__(self, pacs: DicomwebPacs, *args: Any, sync_seconds: float = 60.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pacs = pacs
        self.sync_seconds = sync_seconds
        self._stop = threading.Event()
        self._sync_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._segs_seen: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------------

    def open(self) -> None:
        super().open()
        self._thread = threading.Thread(target=self._sync_loop, name="dicomweb-sync", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        super().close()

    def _sync_loop(self) -> None:
        """A pass now, then every sync_seconds (0: none after the first that succeeds). A failed
        pass (PACS down, index busy) is retried after 1, 2, 4 ... s, at most sync_seconds or 60 s."""
        backoff = 1.0
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as err:
                if isinstance(err, LabelgridError):
                    log.warning("DICOMweb sync failed: %s", err)
                else:
                    log.exception("DICOMweb sync failed")
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, self.sync_seconds if self.sync_seconds > 0 else 60.0)
                continue
            backoff = 1.0
            if self.sync_seconds <= 0 or self._stop.wait(self.sync_seconds):
                return

    # -- sync ----------------------------------------------------------------------------

    def sync(self) -> dict[str, int]:
        """One pass over the PACS: new or changed series are indexed (fetched only when asked for);
        returns how many series were listed anew, were unchanged, and SEGs imported."""
        counts = {"listed": 0, "unchanged": 0, "skipped": 0, "segs": 0, "removed": 0}
        with self._sync_lock:
            listed: set[str] = set()
            for series in self.pacs.list_series():
                if self._stop.is_set():
                    break
                listed.add(series.series_uid)
                try:
                    listed_now = self._mirror(series, fetch=False)
                except InvalidArgument as err:  # a series that is not one volume (scout, multi-frame mix, ...)
                    counts["skipped"] += 1
                    log.warning("DICOMweb series %s skipped: %s", series.series_uid, err)
                    continue
                counts["listed" if listed_now else "unchanged"] += 1
            if not self._stop.is_set():
                counts["removed"] = self._drop_removed(listed)
            for seg in self.pacs.list_segs():
                if self._stop.is_set():
                    break
                if seg.series_uid in self._segs_seen:
                    continue
                try:
                    counts["segs"] += int(self._import_seg(seg))
                    self._segs_seen.add(seg.series_uid)
                except InvalidArgument as err:
                    self._segs_seen.add(seg.series_uid)
                    log.warning("DICOMweb SEG %s not imported: %s", seg.series_uid, err)
        log.info("DICOMweb sync", extra=counts)
        return counts

    def _drop_removed(self, listed: set[str]) -> int:
        """Series the index holds that the PACS no longer has leave the index (labels and cached
        bytes too). One the filter did not list (asked for by id) stays while the PACS has it."""
        gone = 0
        known = [image.image_id for image in self._all_images() if image.info.get("SeriesInstanceUID")]
        for image_id in known:
            if image_id in listed or self._stop.is_set():
                continue
            if self.pacs.find_series(image_id) is not None:
                continue
            with self._locks(f"dicomweb:{image_id}"):
                try:
                    super().delete_image(image_id)
                except NotFound:
                    continue
            gone += 1
            log.info("DICOMweb series %s is no longer in the PACS: removed from the index", image_id)
        return gone

    def _mirror(self, series: PacsSeries, *, fetch: bool, refetch: bool = False) -> bool:
        """Indexes the series (`fetch` False) or makes sure its current content is cached (True);
        True if something changed.

        One series at a time (a sync pass and a request for the same series wait for each
        other, other series do not: a request never waits for a whole pass)."""
        with self._locks(f"dicomweb:{series.series_uid}"):
            return self._mirror_locked(series, fetch, refetch)

    def _mirror_locked(self, series: PacsSeries, fetch: bool, refetch: bool) -> bool:
        key = self.pacs.content_key(series)
        old = self._find_image(series.series_uid)
        kept = {k: v for k, v in (old.info if old else {}).items() if k not in ("ts", "name")}
        # Cached and current, here (or, with a shared index, by another replica: then this
        # one converts its own copy, byte for byte the same: same pixels, deterministic gzip).
        if (
            old is not None
            and old.info.get(CACHED_KEY) == key
            and not (refetch and fetch and not self.blobs.exists(image_key(old.file_name)))
        ):
            return False
        if not fetch:
            if old is not None and old.info.get(CONTENT_KEY) == key:
                return False
            info = {**kept, **series.info(), CONTENT_KEY: key, CACHED_KEY: kept.get(CACHED_KEY, "")}
            if old is None:  # listed, not fetched: no bytes yet (size 0) until someone asks for it
                self.index.upsert_image(series.series_uid, ".nii.gz", "", 0, info)
            else:  # changed in the PACS: the cached copy is stale, fetched again when asked for
                self.index.update_image_info(series.series_uid, info, replace=True)
            self._changed()
            return True
        datasets = self.pacs.fetch(series)
        fd, name = tempfile.mkstemp(prefix="series-", suffix=".nii.gz", dir=self.blobs.spool_dir())
        os.close(fd)
        path = Path(name)
        try:
            series_to_nifti(datasets, path)
            spooled = SpooledFile(path, path.stat().st_size, sha256_file(path))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        info = {**kept, **series.info(), CONTENT_KEY: key, CACHED_KEY: key}
        super().add_image(spooled, image_id=series.series_uid, file_name=f"{series.series_uid}.nii.gz", info=info)
        log.info("DICOMweb series %s cached (%d instances)", series.series_uid, len(datasets))
        return True

    @staticmethod
    def _series_of(image: ImageRecord) -> PacsSeries:
        info = image.info
        return PacsSeries(
            study_uid=str(info["StudyInstanceUID"]),
            series_uid=str(info["SeriesInstanceUID"]),
            modality=str(info.get("Modality", "")),
            patient_id=str(info.get("PatientID", "")),
            description=str(info.get("SeriesDescription", "")),
            instances=0,
        )

    def _import_seg(self, seg_series: PacsSeries) -> bool:
        """A SEG made elsewhere (or by an earlier run) becomes its source series' final label."""
        segs = self.pacs.fetch(seg_series)
        if not segs:
            return False
        source_uid = referenced_series(segs[0])
        image = self._find_image(source_uid) if source_uid else None
        if image is None or DEFAULT_TAG_FINAL in image.labels:
            return False
        if seg_series.series_uid in (image.info.get(SUPERSEDED_KEY) or []):
            return False  # its final label was deleted or replaced here
        image = self.get_image(source_uid)  # fetched now if it was only listed
        spool = Path(self.blobs.spool_dir())
        fd, image_name = tempfile.mkstemp(prefix="image-", suffix=".nii.gz", dir=spool)
        with os.fdopen(fd, "wb") as out:
            for chunk in self.blobs.open_read(image_key(image.file_name)):
                out.write(chunk)
        fd, label_name = tempfile.mkstemp(prefix="seg-", suffix=".nii.gz", dir=spool)
        os.close(fd)
        image_path, label_path = Path(image_name), Path(label_name)
        try:
            seg_to_label(segs[0], image_path, label_path)
            spooled = SpooledFile(label_path, label_path.stat().st_size, sha256_file(label_path))
        except BaseException:
            label_path.unlink(missing_ok=True)
            raise
        finally:
            image_path.unlink(missing_ok=True)
        super().add_label(
            spooled,
            image_id=source_uid,
            tag=DEFAULT_TAG_FINAL,
            file_name=f"{source_uid}.nii.gz",
            info={SEG_KEY: seg_series.series_uid, "source": "dicomweb"},
        )
        return True

    # -- images: a series asked for by id is fetched on demand --------------------------

    def get_image(self, image_id: str) -> ImageRecord:
        """The image, its current content cached first: a series is fetched when someone asks
        for it (inference, training, a label), not when it is listed."""
        try:
            image = super().get_image(image_id)
        except NotFound:
            series = self.pacs.find_series(image_id)
            if series is None:
                raise
            self._mirror(series, fetch=True)
            return super().get_image(image_id)
        if image.info.get("SeriesInstanceUID") and (
            image.info.get(CACHED_KEY) != image.info.get(CONTENT_KEY)
            or not self.blobs.exists(image_key(image.file_name))  # another replica cached it
        ):
            self._mirror(self._series_of(image), fetch=True, refetch=True)
            image = super().get_image(image_id)
        return image

    # -- labels: final ones go back to the PACS as DICOM SEG ------------------------------

    def add_label(
        self, spooled: SpooledFile, *, image_id: str, tag: str, file_name: str, info: dict[str, Any]
    ) -> LabelRecord:
        if (tag or DEFAULT_TAG_FINAL) != DEFAULT_TAG_FINAL:
            try:
                self.get_image(image_id)  # cached first (a raw label.bin is converted against it)
            except BaseException:
                Path(spooled.path).unlink(missing_ok=True)
                raise
            return super().add_label(spooled, image_id=image_id, tag=tag, file_name=file_name, info=info)
        try:
            image = self.get_image(image_id)
            old_seg = self._final_seg(image_id)
            if raw_labels.is_raw_label(file_name):  # OHIF's label.bin: voxels on the image's grid
                spooled, file_name = self._label_from_raw(spooled, image.image_id), f"{image.image_id}.nii.gz"
            seg_uid = self._store_seg(image, Path(spooled.path), file_name, info)
        except BaseException:
            Path(spooled.path).unlink(missing_ok=True)
            raise
        record = super().add_label(
            spooled, image_id=image_id, tag=tag, file_name=file_name, info={**info, SEG_KEY: seg_uid}
        )
        if old_seg and old_seg != seg_uid:
            self._supersede(image_id, old_seg)
        return record

    def delete_label(self, image_id: str, tag: str) -> None:
        """The label leaves the index. A final label's SEG stays in the PACS (DICOMweb, PS3.18,
        defines no delete) but is marked superseded first, so no sync brings the label back."""
        if (tag or DEFAULT_TAG_FINAL) == DEFAULT_TAG_FINAL:
            seg = self._final_seg(image_id)
            if seg:
                self._supersede(image_id, seg)
        super().delete_label(image_id, tag)

    def _final_seg(self, image_id: str) -> str:
        try:
            return str(super().get_label(image_id, DEFAULT_TAG_FINAL).info.get(SEG_KEY) or "")
        except NotFound:
            return ""

    def _supersede(self, image_id: str, seg_uid: str) -> None:
        image = self._find_image(image_id)
        if image is None:
            return
        superseded = [str(uid) for uid in image.info.get(SUPERSEDED_KEY) or []]
        if seg_uid not in superseded:
            super().update_image_info(image_id, {SUPERSEDED_KEY: [*superseded, seg_uid]})
            log.info("DICOMweb SEG %s of %s superseded (kept in the PACS: DICOMweb has no delete)", seg_uid, image_id)

    def _store_seg(self, image: ImageRecord, label_path: Path, file_name: str, info: dict[str, Any]) -> str:
        if not image.info.get("SeriesInstanceUID"):
            raise InvalidArgument(f"image {image.image_id!r} is not a DICOMweb series")
        ext = label_ext_from_name(file_name)
        # The readers go by the file's extension; the spooled upload has none.
        fd, named = tempfile.mkstemp(prefix="label-", suffix=ext, dir=self.blobs.spool_dir())
        os.close(fd)
        named_path = Path(named)
        try:
            named_path.unlink()
            os.link(label_path, named_path)
            volume = VolumeFiles().read(named_path, file_name)
        finally:
            named_path.unlink(missing_ok=True)
        series = self._series_of(image)
        names = _label_names(info)
        seg = label_to_seg(volume.data.round().astype("uint16"), volume.affine, self.pacs.metadata(series), names)
        self.pacs.store([seg], series.study_uid)
        self._segs_seen.add(str(seg.SeriesInstanceUID))
        log.info("final label of %s stored in the PACS as SEG %s", image.image_id, seg.SeriesInstanceUID)
        return str(seg.SeriesInstanceUID)


def _label_names(info: dict[str, Any]) -> dict[int, str]:
    """MONAI Label's label map in the save params ({"label_names": {"spleen": 1, ...}}), if any."""
    names = info.get("label_names")
    if not isinstance(names, dict):
        return {}
    out = {}
    for name, value in names.items():
        try:
            out[int(value)] = str(name)
        except (TypeError, ValueError):
            continue
    return out
