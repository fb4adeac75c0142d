"""DICOM SEG in one place (highdicom): a label volume as a SEG referencing its source series, and
a SEG read back onto a stored image's voxels.

Used by the datastore (final labels written back to the PACS, SEGs made elsewhere imported) and
by the gateway (`POST /infer/{model}?output=dicom_seg`), so neither imports the other.
Everything here is plain data in, plain data out: no HTTP, no gRPC.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileDataset
from pydicom.sr.codedict import codes

from services.common.errors import InvalidArgument
from services.common.models.volumes import load_spatial_image

SEG_MEDIA_TYPE = "application/dicom"


def datasets_from_metadata(items: list[dict[str, Any]]) -> list[pydicom.Dataset]:
    """WADO-RS metadata (DICOM JSON, no pixel data) as datasets: enough for a SEG to reference
    the series. Bulk data references are dropped (they would be fetched one by one)."""
    datasets = []
    for item in items:
        kept = {tag: value for tag, value in item.items() if "BulkDataURI" not in value and "InlineBinary" not in value}
        datasets.append(pydicom.Dataset.from_json(kept))
    return datasets


def as_file(dataset: pydicom.Dataset) -> FileDataset:
    """A dataset as a DICOM file (preamble, 'DICM', meta header): pydicom's defaults leave a
    plain Dataset without them (a PACS may store it and then serve files no reader accepts)."""
    meta = getattr(dataset, "file_meta", None) or pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return FileDataset(None, dataset, file_meta=meta, preamble=b"\0" * 128)  # type: ignore[arg-type]  # in memory: no file name


def to_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    as_file(dataset).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def label_to_seg(
    label: np.ndarray,
    affine: np.ndarray,
    source: list[pydicom.Dataset],
    names: dict[int, str],
    *,
    algorithm: str = "",
    description: str = "labelgrid final label",
) -> hd.seg.Segmentation:
    """A DICOM SEG (one binary segment per label value) referencing `source`, from a label
    volume in RAS world coordinates (as the datastore stores it and inference answers it).
    `algorithm` names the model for an automatic segmentation; empty means manual."""
    values = sorted(int(v) for v in np.unique(label) if v > 0)
    if not values:
        raise InvalidArgument("the label is empty: a DICOM SEG needs at least one labeled voxel")
    frame_of_reference = source[0].get("FrameOfReferenceUID")
    volume = hd.Volume.from_nibabel(
        nib.Nifti1Image(np.asarray(label).astype(np.uint16), affine), frame_of_reference_uid=frame_of_reference
    )
    relabeled = np.zeros(volume.spatial_shape, dtype=np.uint16)
    for number, value in enumerate(values, start=1):
        relabeled[volume.array == value] = number
    volume = volume.with_array(relabeled)
    if algorithm:
        kind = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        identification: hd.AlgorithmIdentificationSequence | None = hd.AlgorithmIdentificationSequence(
            name=algorithm[:64], family=codes.cid7162.ArtificialIntelligence, version="labelgrid"
        )
    else:
        kind, identification = hd.seg.SegmentAlgorithmTypeValues.MANUAL, None
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=names.get(value, f"label-{value}")[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=kind,
            algorithm_identification=identification,
        )
        for number, value in enumerate(values, start=1)
    ]
    try:
        return hd.seg.Segmentation(
            source_images=source,
            pixel_array=volume,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=9901,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="labelgrid",
            manufacturer_model_name="labelgrid",
            software_versions="0.1.0",
            device_serial_number="labelgrid",
            series_description=description[:64],
            omit_empty_frames=True,
        )
    except (ValueError, TypeError) as err:
        raise InvalidArgument(f"the label does not lie on the series' grid ({str(err)[:200]})") from None


def seg_to_label(seg: pydicom.Dataset, image_path: Path, path: Path) -> None:
    """A SEG read back onto the voxels of the stored image (`image_path`, NIfTI): segment n -> n."""
    segmentation = hd.seg.Segmentation.from_dataset(seg)
    image = load_spatial_image(image_path)
    grid = hd.Volume.from_nibabel(image, frame_of_reference_uid=seg.FrameOfReferenceUID)
    volume = segmentation.get_volume(combine_segments=True, relabel=False, dtype=np.uint8)
    matched = volume.match_geometry(grid)
    out = nib.Nifti1Image(np.asarray(matched.to_nibabel().dataobj).astype(np.uint8), image.affine)
    if out.shape != image.shape[:3] or not np.allclose(matched.to_nibabel().affine, image.affine, atol=1e-3):
        raise InvalidArgument("the SEG does not lie on its source series' grid")
    nib.save(out, str(path))


def referenced_series(seg: pydicom.Dataset) -> str:
    refs = seg.get("ReferencedSeriesSequence") or []
    return str(refs[0].SeriesInstanceUID) if refs else ""
