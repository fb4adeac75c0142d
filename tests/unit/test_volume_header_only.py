"""VolumeFiles.read(header_only=True): what a task that reads the file itself (a bundle) needs
from the inference service: the same checks, shape and affine, no voxels decompressed or held."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.models.volumes import VolumeFiles


def test_header_only_has_the_shape_and_affine_of_a_full_read(tmp_path: Path) -> None:
    affine = np.array([[-1.2, 0, 0, 30.0], [0, -1.0, 0, 20.0], [0, 0, 2.5, -10.0], [0, 0, 0, 1]])
    data = np.random.default_rng(0).normal(size=(20, 18, 12, 1)).astype(np.float32)  # a trailing 1 is dropped
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    full = VolumeFiles().read(path, "ct.nii.gz")
    header = VolumeFiles().read(path, "ct.nii.gz", header_only=True)
    assert header.shape == full.shape == (20, 18, 12)
    np.testing.assert_array_equal(header.affine, full.affine)
    assert header.path == full.path == path
    assert header.data.strides == (0, 0, 0) and not header.data.any()  # a stand-in, nothing held


def test_header_only_still_refuses_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.nii.gz"
    payload = nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)).to_bytes()
    path.write_bytes(gzip.compress(payload[: len(payload) // 2]))
    with pytest.raises(InvalidArgument):
        VolumeFiles().read(path, "cut.nii.gz", header_only=True)
