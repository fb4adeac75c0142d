"""A DICOMweb server (a PACS: Orthanc, DCM4CHEE, Google Healthcare) as the datastore's image source.

Everything that speaks HTTP or DICOM lives here, through well-kept libraries: `dicomweb-client`
for QIDO-RS / WADO-RS / STOW-RS, `highdicom` for the geometry of a series (slice order,
orientation, spacing: `get_volume_from_series`); DICOM SEG itself is services/common/dicom_seg.py
(shared with the gateway's infer output=dicom_seg). The domain only ever sees NIfTI files and ids.

An image is a series: id = SeriesInstanceUID. Its *content key* is a hash of the series'
SOP Instance UIDs as QIDO lists them, so a series that changes in the PACS (instances added or
replaced) is fetched and converted again (MONAI Label issue 944).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from services.common.dicom_seg import as_file, datasets_from_metadata
from services.common.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)
# dicomweb-client logs every request's headers at DEBUG, the Authorization header included:
# never let that through, whatever the service's log level.
logging.getLogger("dicomweb_client").setLevel(logging.INFO)

# Series that are never images: derived objects, reports, presentation states.
NOT_IMAGES = {"SEG", "RTSTRUCT", "SR", "PR", "KO", "REG", "RTPLAN", "RTDOSE", "DOC"}
QIDO_PAGE = 200

_TAG_STUDY, _TAG_SERIES, _TAG_MODALITY = "0020000D", "0020000E", "00080060"
_TAG_PATIENT, _TAG_DESCRIPTION, _TAG_SOP = "00100020", "0008103E", "00080018"
_TAG_COUNT, _TAG_NUMBER = "00201209", "00200011"


def _value(item: dict[str, Any], tag: str, default: Any = "") -> Any:
    values = item.get(tag, {}).get("Value")
    return values[0] if values else default


@dataclass(frozen=True)
class PacsSeries:
    study_uid: str
    series_uid: str
    modality: str
    patient_id: str
    description: str
    instances: int

    def info(self) -> dict[str, Any]:
        """The image info OHIF's panel shows for a next-sample (MONAI Label's DICOMweb fields)."""
        return {
            "StudyInstanceUID": self.study_uid,
            "SeriesInstanceUID": self.series_uid,
            "PatientID": self.patient_id,
            "Modality": self.modality,
            "SeriesDescription": self.description,
        }


def parse_search_filter(text: str) -> dict[str, Any]:
    """MONAI Label's MONAI_LABEL_DICOMWEB_SEARCH_FILTER: a JSON object of QIDO attributes."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"dicomweb_search_filter is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError('dicomweb_search_filter must be a JSON object such as {"Modality": "CT"}')
    return value


class DicomwebPacs:
    """QIDO / WADO / STOW against one DICOMweb root. Credentials go into the HTTP session
    (basic) or a header (bearer); neither is ever logged or put into an error message."""

    def __init__(
        self,
        url: str,
        *,
        username: str = "",
        password: str = "",
        token: str = "",
        search_filter: dict[str, Any] | None = None,
        timeout_seconds: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        session = requests.Session()
        headers = {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif username:
            session.auth = (username, password)
        self.search_filter = dict(search_filter or {})
        self.client = DICOMwebClient(
            self.url, session=session, headers=headers, timeout=(min(10.0, timeout_seconds), timeout_seconds)
        )
        # Its retries (5 attempts, exponential back-off, also on a refused connection) would make a
        # PACS that is down answer after ~15 s per call; the sync loop is our retry.
        self.client.set_http_retry_params(retry=False)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except requests.HTTPError as err:
            status = err.response.status_code if err.response is not None else 0
            raise Unavailable(
                f"the DICOMweb server {self.url} answered {status} to {what}", reason="PACS_UNAVAILABLE"
            ) from None
        except requests.RequestException as err:
            raise Unavailable(
                f"the DICOMweb server {self.url} is unavailable ({what}: {type(err).__name__})",
                reason="PACS_UNAVAILABLE",
            ) from None

    def _search(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """QIDO-RS /series, paged with limit/offset (a PACS may cap each answer)."""
        offset = 0
        while True:
            page = self._call(
                "QIDO series",
                self.client.search_for_series,
                search_filters=filters,
                fields=[_TAG_COUNT, _TAG_DESCRIPTION, _TAG_NUMBER],
                limit=QIDO_PAGE,
                offset=offset,
            )
            yield from page
            if len(page) < QIDO_PAGE:
                return
            offset += len(page)

    def list_series(self) -> list[PacsSeries]:
        """The image series the search filter selects (never SEG, SR, ...)."""
        found = []
        for item in self._search(**self.search_filter):
            series = self._series(item)
            if series.modality.upper() not in NOT_IMAGES and series.series_uid:
                found.append(series)
        return found

    def find_series(self, series_uid: str) -> PacsSeries | None:
        items = list(self._search(SeriesInstanceUID=series_uid))
        series = [self._series(item) for item in items]
        return next((s for s in series if s.series_uid == series_uid and s.modality.upper() not in NOT_IMAGES), None)

    def list_segs(self) -> list[PacsSeries]:
        return [self._series(item) for item in self._search(Modality="SEG")]

    @staticmethod
    def _series(item: dict[str, Any]) -> PacsSeries:
        return PacsSeries(
            study_uid=str(_value(item, _TAG_STUDY)),
            series_uid=str(_value(item, _TAG_SERIES)),
            modality=str(_value(item, _TAG_MODALITY)),
            patient_id=str(_value(item, _TAG_PATIENT)),
            description=str(_value(item, _TAG_DESCRIPTION)),
            instances=int(_value(item, _TAG_COUNT, 0) or 0),
        )

    def content_key(self, series: PacsSeries) -> str:
        """A hash of the series' instance UIDs: changes when the PACS's copy changes."""
        instances = self._call(
            "QIDO instances",
            self.client.search_for_instances,
            series.study_uid,
            series.series_uid,
            fields=[_TAG_SOP],
            get_remaining=True,
        )
        uids = sorted(str(_value(item, _TAG_SOP)) for item in instances)
        return hashlib.sha256("\n".join(uids).encode()).hexdigest()

    def fetch(self, series: PacsSeries) -> list[pydicom.Dataset]:
        """WADO-RS: every instance of the series, pixel data included."""
        return self._call("WADO series", self.client.retrieve_series, series.study_uid, series.series_uid)

    def metadata(self, series: PacsSeries) -> list[pydicom.Dataset]:
        """WADO-RS metadata (no pixel data): enough for a SEG to reference the series."""
        items = self._call("WADO metadata", self.client.retrieve_series_metadata, series.study_uid, series.series_uid)
        return datasets_from_metadata(items)

    def store(self, datasets: list[pydicom.Dataset], study_uid: str) -> None:
        """STOW-RS. Each dataset is sent as a DICOM file (preamble, 'DICM', meta header)."""
        files = [as_file(ds) for ds in datasets]
        self._call("STOW", self.client.store_instances, files, study_uid)


# -- conversions ---------------------------------------------------------------------------


def series_to_nifti(datasets: list[pydicom.Dataset], path: Path) -> None:
    """A series as one NIfTI volume with its true geometry (highdicom sorts the slices along
    their normal and derives orientation and spacing from the headers; the affine is RAS).

    The voxels keep DICOM's own order, as cornerstone (OHIF) holds the series: first index the
    column, second the row, third the slice by increasing position along the row x column
    cosines. A label on this grid (what inference answers, as NRRD for OHIF) is then also
    right for OHIF's panel, which copies the NRRD's voxels into its labelmap by index, ignoring
    the header. Modality rescale applied; int16 when lossless."""
    try:
        volume = hd.get_volume_from_series(datasets, dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - highdicom raises ValueError/RuntimeError/... for non-volumes
        raise InvalidArgument(f"series is not one regular volume ({type(err).__name__}: {str(err)[:200]})") from None
    image = volume.to_nibabel()  # indices (slice, row, column)
    data = np.asarray(image.dataobj).transpose(2, 1, 0)
    affine = np.array(image.affine, dtype=float)[:, [2, 1, 0, 3]]
    cosines = [float(v) for v in datasets[0].ImageOrientationPatient]
    to_ras = np.array([-1.0, -1.0, 1.0])
    row, column = np.array(cosines[:3]) * to_ras, np.array(cosines[3:]) * to_ras
    for axis, direction in enumerate((row, column, np.cross(cosines[:3], cosines[3:]) * to_ras)):
        if float(affine[:3, axis] @ direction) < 0:  # highdicom ran this axis the other way
            affine[:3, 3] += affine[:3, axis] * (data.shape[axis] - 1)
            affine[:3, axis] *= -1
            data = np.flip(data, axis=axis)
    data = np.ascontiguousarray(data)
    if data.size and np.all(np.mod(data, 1) == 0) and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    out = nib.Nifti1Image(data, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    nib.save(out, str(path))
