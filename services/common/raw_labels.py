"""Raw label voxels (`label.bin`, what OHIF v2 sends) turned into a label volume on the image's grid.

MONAI Label's `binary_to_image`: the file is the label's uint8 voxels, first axis fastest
(Fortran order, as NIfTI and NRRD store them), exactly as many as the image has; the label
takes the image's shape and voxel-to-world affine. Only the image's header is read.
Shared by the datastore (PUT /datastore/label) and inference (the infer `label` part).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

from services.common.errors import InvalidArgument
from services.common.models.volumes import load_spatial_image, nrrd_affine

RAW_LABEL_EXT = ".bin"


def is_raw_label(file_name: str) -> bool:
    return Path(file_name).name.lower().endswith(RAW_LABEL_EXT)


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    """As the volume reader: trailing axes of length 1 (a 4D NIfTI of one frame) do not count."""
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def image_geometry(path: Path, file_name: str) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, RAS affine) of a NIfTI or NRRD image from its header alone."""
    lower = file_name.lower()
    try:
        if lower.endswith((".nii.gz", ".nii")):
            image = load_spatial_image(path)
            shape, affine = tuple(int(n) for n in image.shape), np.asarray(image.affine, dtype=np.float64)
        elif lower.endswith(".nrrd"):
            header = nrrd.read_header(str(path))
            shape, affine = tuple(int(n) for n in header["sizes"]), nrrd_affine(header)
        else:
            raise InvalidArgument(
                f"a raw label ({RAW_LABEL_EXT}) needs a NIfTI or NRRD image to take its grid from; "
                f"image {file_name!r} is neither"
            )
    except InvalidArgument:
        raise
    except Exception as error:
        reason = str(error).replace(str(path), file_name)
        raise InvalidArgument(f"image {file_name!r} is not a readable volume: {reason}") from error
    shape = _spatial(shape)
    if len(shape) != 3:
        raise InvalidArgument(f"image {file_name!r} has shape {list(shape)}; a raw label needs a 3D image")
    return shape, affine


def read_raw_label(path: Path, shape: tuple[int, ...], file_name: str = "label.bin") -> np.ndarray:
    """The label voxels of `path` as a uint8 array of `shape`; InvalidArgument when the size differs."""
    expected = int(np.prod(shape))
    size = os.path.getsize(path)
    if size != expected:
        dims = "x".join(str(n) for n in shape)
        raise InvalidArgument(
            f"{file_name} has {size} bytes, but the image is {dims} voxels: a raw label must hold exactly "
            f"{expected} uint8 voxels (first axis fastest)",
            reason="INVALID_INPUT",
            metadata={"size_bytes": str(size), "expected_bytes": str(expected), "shape": dims},
        )
    return np.fromfile(path, dtype=np.uint8).reshape(shape, order="F")


def raw_label_to_nifti(raw_path: Path, image_path: Path, image_file_name: str, dest_dir: Path) -> Path:
    """Writes the raw label as a gzipped NIfTI (uint8) on the image's grid into `dest_dir`; returns its path."""
    shape, affine = image_geometry(image_path, image_file_name)
    data = read_raw_label(raw_path, shape)
    label = nib.Nifti1Image(data, affine)
    label.set_qform(affine, code=1)
    label.set_sform(affine, code=1)
    handle, name = tempfile.mkstemp(prefix="label-", suffix=".nii.gz", dir=dest_dir)
    os.close(handle)
    path = Path(name)
    try:
        nib.save(label, str(path))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path
