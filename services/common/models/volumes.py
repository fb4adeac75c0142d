"""Reading images and writing labels: NIfTI through nibabel, NRRD through pynrrd.

Shared by inference (reads images, writes labels) and active learning scoring (reads
images and labels).

Affines are RAS (nibabel's convention) inside the service. NRRD files are LPS, so their
space directions and origin are flipped on the way in and out (as MONAI's NrrdReader and
3D Slicer do), and a label written here lands exactly on its image in any viewer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
from nibabel.spatialimages import SpatialImage

from services.common.errors import InvalidArgument
from services.common.formats import VolumeLimits, check_volume, current_limits, refuse_detached_nrrd
from services.common.models.types import Volume

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def nrrd_affine(header: dict[str, Any]) -> np.ndarray:
    """The RAS voxel-to-world affine of an NRRD header (identity where the header says nothing)."""
    directions = header.get("space directions")
    origin = header.get("space origin")
    affine = np.eye(4)
    if directions is not None:
        rows = [
            np.asarray(row, dtype=float)
            for row in directions
            if row is not None and not np.any(np.isnan(np.asarray(row, dtype=float)))
        ]
        if len(rows) == 3:
            affine[:3, :3] = np.stack(rows, axis=1)  # one column per voxel axis
    if origin is not None:
        affine[:3, 3] = np.asarray(origin, dtype=float)
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        affine = _LPS_TO_RAS @ affine
    return affine


def load_spatial_image(path: Path | str) -> SpatialImage:
    """`nib.load` of a NIfTI file, typed as what it returns for one (nibabel annotates the base
    FileBasedImage, which has no affine, shape or dataobj)."""
    image = nib.load(str(path))
    if not isinstance(image, SpatialImage):
        raise InvalidArgument(f"{Path(path).name!r} is not a volume image")
    return image


def _read_nrrd(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """pynrrd on an open file: the header it parses is checked again for a detached data file, and
    with no file name given it can only read this file's own bytes."""
    with open(path, "rb") as stream:
        header = nrrd.read_header(stream)
        refuse_detached_nrrd(header)
        return nrrd.read_data(header, stream, None), header


class VolumeFiles:
    """`VolumeIO` over files on local disk.

    Every read runs the shared volume check first (`services.common.formats.check_volume`): no
    header makes a reader open another file, and no header sizes an allocation over `limits`.
    """

    def __init__(self, limits: VolumeLimits | None = None) -> None:
        self._limits = limits

    @property
    def limits(self) -> VolumeLimits:
        """Its own caps, else the service's (formats.current_limits)."""
        return self._limits or current_limits()

    def read(self, path: Path, file_name: str, header_only: bool = False) -> Volume:
        """The volume at `path`; `header_only` (a NIfTI whose voxels the task reads itself, such as
        a bundle's LoadImaged) checks it and takes shape and affine from its header, without
        decompressing the voxels: its `data` is then a zero-size stand-in of the right shape."""
        lower = file_name.lower()
        ext = next((e for e in (".nii.gz", ".nii", ".seg.nrrd", ".nrrd") if lower.endswith(e)), "")
        if not ext:
            raise InvalidArgument(f"image {file_name!r}: only .nii.gz, .nii and .nrrd volumes are supported")
        check_volume(path, ext, self.limits)
        try:
            if ext in (".nii.gz", ".nii"):
                image = load_spatial_image(path)
                if header_only:
                    shape = tuple(int(n) for n in image.shape)
                    data = np.broadcast_to(np.zeros((), dtype=np.float32), shape)  # no voxels read or held
                else:
                    data = np.asanyarray(image.dataobj, dtype=np.float32)
                affine = np.asarray(image.affine, dtype=np.float64)
            else:
                raw, header = _read_nrrd(path)
                data = np.asarray(raw, dtype=np.float32)
                affine = nrrd_affine(header)
        except InvalidArgument:
            raise
        except Exception as error:
            # The reason only: a reader's message may name paths (the scratch file, or any other).
            raise InvalidArgument(f"image {file_name!r} is not a readable volume ({type(error).__name__})") from error
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise InvalidArgument(f"image {file_name!r} has shape {list(data.shape)}; a 3D volume is needed")
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise InvalidArgument(f"image {file_name!r} has a degenerate affine")
        return Volume(data if header_only else np.ascontiguousarray(data), affine, file_name, Path(path))

    def write_label(
        self, label: Any, affine: Any, dest_dir: Path, stem: str, extension: str, dtype: str, compress: bool
    ) -> Path:
        data = np.asarray(label).astype(np.dtype(dtype))
        affine = np.asarray(affine, dtype=float)
        path = Path(dest_dir) / f"{stem}{extension}"
        if extension in (".nii.gz", ".nii"):
            image = nib.Nifti1Image(data, affine)
            image.set_qform(affine, code=1)
            image.set_sform(affine, code=1)
            nib.save(image, str(path))
        elif extension == ".nrrd":
            lps = np.linalg.inv(_LPS_TO_RAS) @ affine
            header = {
                "space": "left-posterior-superior",
                "space directions": lps[:3, :3].T,  # one row per voxel axis
                "space origin": lps[:3, 3],
                "kinds": ["domain", "domain", "domain"],
                "encoding": "gzip" if compress else "raw",
            }
            nrrd.write(str(path), data, header, index_order="F")
        else:
            raise InvalidArgument(f"cannot write a label as {extension!r}")
        return path
