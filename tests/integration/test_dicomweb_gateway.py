"""The DICOMweb datastore behind the gateway, as OHIF uses it: series of a real Orthanc listed,
inferred on by SeriesInstanceUID (the label on the series' own grid), final labels saved back
to the PACS as DICOM SEG that read back onto the same voxels."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from services.activelearning.service import start_service as start_activelearning
from services.activelearning.settings import ActiveLearningSettings
from services.common.models.volumes import nrrd_affine
from services.datastore.adapters.dicomweb_store import SEG_KEY
from tests.fixtures.gateway import GatewayStack, real_inference
from tests.fixtures.orthanc import CtSeries, Orthanc, ct_series, expected_grid
from tests.fixtures.polling import wait_until


@pytest.fixture(scope="module")
def pacs_series(orthanc: Orthanc) -> tuple[str, CtSeries, CtSeries]:
    patient = f"DSW-{uuid.uuid4().hex[:8]}"
    # An oblique-free but non-trivial geometry: coronal slices (rows run feet-ward), shuffled.
    first = ct_series(
        slices=6, rows=24, columns=28, row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, 0.0, -1.0),
        pixel_spacing=(1.5, 1.25), slice_step=3.0, seed=11, patient_id=patient,
    )  # fmt: skip
    second = ct_series(slices=4, seed=12, patient_id=patient)
    orthanc.upload(first.datasets)
    orthanc.upload(second.datasets)
    return patient, first, second


class _Both:
    """Two in-process gRPC services the stack stops as one."""

    def __init__(self, *services: Any) -> None:
        self.services = services

    async def stop(self, grace: float | None) -> None:
        for service in self.services:
            await service.stop(grace)


@pytest.fixture(scope="module")
def pacs_stack(
    tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc, pacs_series: tuple[str, CtSeries, CtSeries]
) -> Iterator[GatewayStack]:
    root = tmp_path_factory.mktemp("pacs")
    patient = pacs_series[0]
    start_inference = real_inference(root / "infer")

    async def start_services(datastore_address: str) -> tuple[str, Any]:
        """Inference, and active learning beside it (OHIF's next sample on PACS series)."""
        address, inference = await start_inference(datastore_address)
        activelearning, _ = await start_activelearning(
            ActiveLearningSettings(
                port=0,
                metrics_port=-1,
                datastore=datastore_address,
                device="cpu",
                work_dir=root / "al",
                torch_threads=1,
            )
        )
        stack.gateway_overrides["activelearning_address"] = activelearning.address
        return address, _Both(inference, activelearning)

    stack = GatewayStack(
        root,
        start_inference=start_services,
        datastore_overrides={
            "backend": "dicomweb",
            "dicomweb_url": orthanc.dicomweb_url,
            "dicomweb_search_filter": json.dumps({"Modality": "CT", "PatientID": patient}),
            "dicomweb_sync_seconds": 0,
        },
        gateway_overrides={"dicomweb_url": orthanc.dicomweb_url},
    )
    stack.start()  # after the assignment: start_services names the stack
    yield stack
    stack.stop()


def test_series_are_listed_as_images(pacs_stack: GatewayStack, pacs_series: tuple[str, CtSeries, CtSeries]) -> None:
    _, first, second = pacs_series

    def listed() -> dict[str, Any]:
        objects = httpx.get(f"{pacs_stack.url}/datastore/?output=all", timeout=30).json()["objects"]
        return objects if {first.series_uid, second.series_uid} <= set(objects) else {}

    objects = wait_until(listed, "the series listed")
    info = objects[first.series_uid]["image"]["info"]
    assert info["StudyInstanceUID"] == first.study_uid and info["SeriesInstanceUID"] == first.series_uid
    assert info["PatientID"] == pacs_series[0]


def test_the_cached_image_has_the_series_geometry(
    pacs_stack: GatewayStack, pacs_series: tuple[str, CtSeries, CtSeries], tmp_path: Path
) -> None:
    first = pacs_series[1]
    answer = httpx.get(f"{pacs_stack.url}/datastore/image", params={"image": first.series_uid}, timeout=60)
    assert answer.status_code == 200
    path = tmp_path / "image.nii.gz"
    path.write_bytes(answer.content)
    image = nib.load(path)
    shape, affine, data = expected_grid(first)
    assert image.shape == shape
    np.testing.assert_allclose(image.affine, affine, atol=1e-4)
    assert np.array_equal(np.asarray(image.dataobj), data)  # every voxel where the series put it


def test_infer_by_series_uid_gives_a_label_on_the_series_grid(
    pacs_stack: GatewayStack, pacs_series: tuple[str, CtSeries, CtSeries]
) -> None:
    first = pacs_series[1]
    params = {
        "result_extension": ".nrrd",
        "result_dtype": "uint8",
        "result_compress": False,
        "restore_label_idx": False,
    }
    for attempt in range(2):  # OHIF's request; the second one is served from the cache
        if attempt == 1:
            before = httpx.get(f"{pacs_stack.url}/datastore/?output=all", timeout=30).json()["objects"][
                first.series_uid
            ]
        answer = httpx.post(
            f"{pacs_stack.url}/infer/segmentation",
            params={"image": first.series_uid, "output": "image"},
            files={"params": (None, json.dumps(params))},
            timeout=300,
        )
        assert answer.status_code == 200, answer.text
    header = nrrd.read_header(io.BytesIO(answer.content))
    shape, affine, _ = expected_grid(first)
    assert tuple(int(n) for n in header["sizes"]) == shape
    np.testing.assert_allclose(nrrd_affine(header), affine, atol=1e-4)
    after = httpx.get(f"{pacs_stack.url}/datastore/?output=all", timeout=30).json()["objects"][first.series_uid]
    assert after["image"]["info"]["ts"] == before["image"]["info"]["ts"]  # not fetched or converted again


def test_unknown_series_is_404(pacs_stack: GatewayStack) -> None:
    answer = httpx.post(f"{pacs_stack.url}/infer/segmentation", params={"image": "1.2.3.4.5.999"}, timeout=60)
    assert answer.status_code == 404


def test_saved_final_label_becomes_a_seg_in_the_pacs(
    pacs_stack: GatewayStack, pacs_series: tuple[str, CtSeries, CtSeries], orthanc: Orthanc, tmp_path: Path
) -> None:
    second = pacs_series[2]
    shape, affine, data = expected_grid(second)
    label = (data > 0).astype(np.uint8)
    label[: shape[0] // 2] *= 2  # two labels: two segments
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, affine), path)
    segs_before = orthanc.series_uids("SEG")
    with open(path, "rb") as handle:
        answer = httpx.put(
            f"{pacs_stack.url}/datastore/label",
            params={"image": second.series_uid, "tag": "final"},
            files={"label": ("label.nii.gz", handle), "params": (None, json.dumps({"label_names": {"a": 1, "b": 2}}))},
            timeout=120,
        )
    assert answer.status_code == 200, answer.text
    new = orthanc.series_uids("SEG") - segs_before
    assert len(new) == 1
    (seg_uid,) = new
    client = DICOMwebClient(orthanc.dicomweb_url)
    (seg,) = client.retrieve_series(second.study_uid, seg_uid)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == second.series_uid
    segmentation = hd.seg.Segmentation.from_dataset(seg)
    assert [d.SegmentLabel for d in segmentation.SegmentSequence] == ["a", "b"]
    # Read back onto the series' own grid: the same voxels.
    source = hd.get_volume_from_series(client.retrieve_series(second.study_uid, second.series_uid))
    back = segmentation.get_volume(combine_segments=True, relabel=False, dtype=np.uint8).match_geometry(source)
    on_grid = nib.as_closest_canonical(back.to_nibabel())
    sent = nib.as_closest_canonical(nib.Nifti1Image(label, affine))  # the same axis order for both
    np.testing.assert_allclose(on_grid.affine, sent.affine, atol=1e-4)
    assert np.array_equal(np.asarray(on_grid.dataobj), np.asarray(sent.dataobj))
    objects = httpx.get(f"{pacs_stack.url}/datastore/?output=all", timeout=30).json()["objects"]
    assert objects[second.series_uid]["labels"]["final"]["info"][SEG_KEY] == seg_uid


def test_infer_output_dicom_seg_is_the_label_as_a_seg_of_the_series(
    pacs_stack: GatewayStack, pacs_series: tuple[str, CtSeries, CtSeries], tmp_path: Path
) -> None:
    """output=dicom_seg: the same inference as a NIfTI label, answered as a SEG that references
    the series and whose segments read back onto the very voxels of that label."""
    first = pacs_series[1]
    params = json.dumps({"result_extension": ".nii.gz", "result_dtype": "uint8"})

    def infer(output: str) -> httpx.Response:
        answer = httpx.post(
            f"{pacs_stack.url}/infer/segmentation",
            params={"image": first.series_uid, "output": output},
            files={"params": (None, params)},
            timeout=300,
        )
        assert answer.status_code == 200, answer.text
        return answer

    path = tmp_path / "label.nii.gz"
    path.write_bytes(infer("image").content)
    label_image = nib.load(path)
    label = np.asarray(label_image.dataobj).astype(np.uint16)
    values = sorted(int(v) for v in np.unique(label) if v > 0)
    assert values, "the model labeled nothing: the comparison would prove nothing"

    answer = infer("dicom_seg")
    assert answer.headers["content-type"] == "application/dicom"
    seg = pydicom.dcmread(io.BytesIO(answer.content))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == first.study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.series_uid
    segmentation = hd.seg.Segmentation.from_dataset(seg)
    assert len(segmentation.SegmentSequence) == len(values)
    client = DICOMwebClient(pacs_stack.gateway_overrides["dicomweb_url"])
    source = hd.get_volume_from_series(client.retrieve_series(first.study_uid, first.series_uid))
    back = segmentation.get_volume(combine_segments=True, relabel=False, dtype=np.uint16).match_geometry(source)
    expected = np.zeros_like(label)
    for number, value in enumerate(values, start=1):  # segment n is the n-th label value
        expected[label == value] = number
    on_grid = nib.as_closest_canonical(back.to_nibabel())
    sent = nib.as_closest_canonical(nib.Nifti1Image(expected, label_image.affine))
    np.testing.assert_allclose(on_grid.affine, sent.affine, atol=1e-4)
    assert np.array_equal(np.asarray(on_grid.dataobj), np.asarray(sent.dataobj))


def test_infer_output_dicom_seg_needs_a_series(pacs_stack: GatewayStack, tmp_path: Path) -> None:
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), path)
    with open(path, "rb") as handle:
        answer = httpx.post(
            f"{pacs_stack.url}/infer/segmentation",
            params={"output": "dicom_seg"},
            files={"file": ("x.nii.gz", handle)},
            timeout=60,
        )
    assert answer.status_code == 422 and "SeriesInstanceUID" in answer.json()["detail"]


def test_next_sample_leases_pacs_series_as_it_does_images(
    pacs_stack: GatewayStack, pacs_series: tuple[str, CtSeries, CtSeries]
) -> None:
    """OHIF's "next sample" on a PACS: an unlabeled series, leased to the client that asked, its
    volume downloadable by the answer's path; a second client gets another series (or none)."""
    _, first, second = pacs_series

    def listed() -> dict[str, Any]:
        objects = httpx.get(f"{pacs_stack.url}/datastore/?output=all", timeout=30).json()["objects"]
        return objects if {first.series_uid, second.series_uid} <= set(objects) else {}

    objects = wait_until(listed, "the series listed")
    unlabeled = {uid for uid, entry in objects.items() if "final" not in entry.get("labels", {})}
    assert unlabeled, objects
    asked = httpx.post(f"{pacs_stack.url}/activelearning/first", json={"client_id": "ohif-a"}, timeout=60)
    assert asked.status_code == 200, asked.text
    sample = asked.json()
    assert sample["id"] in unlabeled and sample["lease"]["client_id"] == "ohif-a", sample
    volume = httpx.get(f"{pacs_stack.url}/datastore/image", params={"image": sample["id"]}, timeout=120)
    assert volume.status_code == 200 and len(volume.content) > 0
    other = httpx.post(f"{pacs_stack.url}/activelearning/first", json={"client_id": "ohif-b"}, timeout=60)
    assert other.status_code == 200, other.text
    assert other.json().get("id") != sample["id"]
    if len(unlabeled) == 1:
        assert other.json() == {}
