"""Raw label voxels (OHIF v2's label.bin) onto the image's grid: MONAI Label's binary_to_image."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.models.volumes import VolumeFiles
from services.common.raw_labels import image_geometry, is_raw_label, raw_label_to_nifti, read_raw_label

SHAPE = (7, 5, 3)
AFFINE = np.array([[0.0, -1.5, 0, 20.0], [2.0, 0, 0, -4.0], [0, 0, 3.0, 7.5], [0, 0, 0, 1]])


def labels() -> np.ndarray:
    return (np.arange(np.prod(SHAPE)) % 4).astype(np.uint8).reshape(SHAPE)


def raw(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "label.bin"
    path.write_bytes(data)
    return path


def test_names() -> None:
    assert is_raw_label("label.bin") and is_raw_label("x/LABEL.BIN") and not is_raw_label("label.nii.gz")


@pytest.mark.parametrize("kind", ["nii.gz", "nrrd", "4d-nii"])
def test_label_lands_on_the_image_grid(tmp_path: Path, kind: str) -> None:
    image = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    if kind == "nrrd":
        image_path = tmp_path / "image.nrrd"
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ AFFINE
        nrrd.write(
            str(image_path), image,
            {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]},
            index_order="F",
        )  # fmt: skip
    else:
        image_path = tmp_path / "image.nii.gz"
        nib.save(nib.Nifti1Image(image[..., None] if kind == "4d-nii" else image, AFFINE), str(image_path))
    volume = VolumeFiles().read(image_path, image_path.name)
    shape, affine = image_geometry(image_path, image_path.name)
    assert shape == volume.shape == SHAPE and np.allclose(affine, volume.affine)

    out = raw_label_to_nifti(raw(tmp_path, labels().tobytes(order="F")), image_path, image_path.name, tmp_path)
    stored = nib.load(str(out))
    assert np.allclose(stored.affine, volume.affine)
    assert np.array_equal(np.asarray(stored.dataobj), labels()) and stored.get_data_dtype() == np.uint8


def test_wrong_sizes_and_images(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"has 104 bytes, but the image is 7x5x3 voxels.*exactly 105"):
        read_raw_label(raw(tmp_path, b"\0" * 104), SHAPE)
    with pytest.raises(InvalidArgument, match="exactly 105"):
        read_raw_label(raw(tmp_path, b"\0" * 106), SHAPE)
    zip_path = tmp_path / "series.zip"
    zip_path.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(InvalidArgument, match="NIfTI or NRRD"):
        image_geometry(zip_path, "series.zip")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume")
    with pytest.raises(InvalidArgument, match="not a readable volume") as caught:
        image_geometry(broken, "broken.nii.gz")
    assert str(tmp_path) not in str(caught.value)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4), dtype=np.float32), np.eye(4)), str(flat))
    with pytest.raises(InvalidArgument, match="3D image"):
        image_geometry(flat, "flat.nii.gz")
