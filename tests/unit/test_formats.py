"""Format names and volume checks, on real small files and their corrupt variants."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from services.common.errors import InvalidArgument
from services.datastore.domain import formats
from services.datastore.domain.formats import VolumeHeader, check_volume, image_ext_from_name, label_ext_from_name

SHAPE = (8, 9, 10)


@pytest.mark.parametrize(
    ("name", "ext"),
    [("a.nii.gz", ".nii.gz"), ("a.b.nii", ".nii"), ("ct.nrrd", ".nrrd"), ("series.zip", ".zip"), ("x.seg.nrrd", ".nrrd")],
)
def test_image_ext(name: str, ext: str) -> None:
    assert image_ext_from_name(name) == ext


@pytest.mark.parametrize(
    ("name", "ext"),
    [("a.nii.gz", ".nii.gz"), ("a.nii", ".nii"), ("a.seg.nrrd", ".seg.nrrd"), ("a.nrrd", ".nrrd")],
)
def test_label_ext_longest_match(name: str, ext: str) -> None:
    assert label_ext_from_name(name) == ext


@pytest.mark.parametrize("name", ["a.png", "a.nii.gz.txt", "a", "", "a.dcm", "A.NII.GZ"])
def test_unsupported_image_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        image_ext_from_name(name)
    assert err.value.reason == "INVALID_INPUT"
    assert ".nii.gz, .nii, .nrrd, .zip" in err.value.message
    if name == "A.NII.GZ":
        assert "case-sensitive" in err.value.message


def test_unsupported_label_names() -> None:
    with pytest.raises(InvalidArgument, match=r"\.seg\.nrrd"):
        label_ext_from_name("x.zip")


# -- fixtures: real files ---------------------------------------------------------------


@pytest.fixture
def volume() -> np.ndarray:
    return np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)


@pytest.fixture
def nii(tmp_path: Path, volume: np.ndarray) -> Path:
    affine = np.diag([0.5, 0.75, 2.0, 1.0])
    path = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(volume, affine), path)
    return path


@pytest.fixture
def nii_gz(tmp_path: Path, volume: np.ndarray) -> Path:
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    return path


@pytest.fixture
def nrrd_raw(tmp_path: Path, volume: np.ndarray) -> Path:
    path = tmp_path / "v.nrrd"
    nrrd.write(str(path), volume, {"encoding": "raw", "spacings": [1.5, 1.5, 3.0]})
    return path


@pytest.fixture
def nrrd_gz(tmp_path: Path, volume: np.ndarray) -> Path:
    path = tmp_path / "v.gz.nrrd"
    nrrd.write(str(path), volume.astype(np.float32), {"encoding": "gzip"})
    return path


@pytest.fixture
def dicom_zip(tmp_path: Path) -> Path:
    path = tmp_path / "series.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("README.txt", "not dicom")
        archive.write(get_testdata_file("CT_small.dcm"), "series/IM0001.dcm")
    return path


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- valid files ---------------------------------------------------------------------------


def test_valid_nii(nii: Path) -> None:
    assert check_volume(nii, ".nii") == VolumeHeader(SHAPE, "int16", (0.5, 0.75, 2.0))


def test_valid_nii_gz(nii_gz: Path) -> None:
    assert check_volume(nii_gz, ".nii.gz") == VolumeHeader(SHAPE, "int16", (1.0, 1.0, 1.0))


def test_valid_nifti2(tmp_path: Path, volume: np.ndarray) -> None:
    path = tmp_path / "v2.nii.gz"
    nib.save(nib.Nifti2Image(volume.astype(np.float64), np.eye(4)), path)
    assert check_volume(path, ".nii.gz").dtype == "float64"


def test_valid_nrrd_raw_and_gzip(nrrd_raw: Path, nrrd_gz: Path) -> None:
    assert check_volume(nrrd_raw, ".nrrd") == VolumeHeader(SHAPE, "int16", (1.5, 1.5, 3.0))
    assert check_volume(nrrd_gz, ".nrrd").dtype == "float32"
    assert check_volume(nrrd_gz, ".seg.nrrd").shape == SHAPE


def test_valid_dicom_zip(dicom_zip: Path) -> None:
    header = check_volume(dicom_zip, ".zip")
    assert header.shape[:2] == (128, 128) and header.dtype == "int16"


def test_spool_names_do_not_matter(nii_gz: Path, tmp_path: Path) -> None:
    """Uploads are spooled as upload-XXXX.part: the format comes from `ext`, never the path."""
    spooled = tmp_path / "upload-abc.part"
    spooled.write_bytes(nii_gz.read_bytes())
    assert check_volume(spooled, ".nii.gz").shape == SHAPE


# -- corrupt files -------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".zip"])
def test_empty_file(tmp_path: Path, ext: str) -> None:
    with pytest.raises(InvalidArgument, match=r"empty \(0 bytes\)") as err:
        check_volume(_write(tmp_path, "e", b""), ext)
    assert err.value.reason == "INVALID_INPUT"


@pytest.mark.parametrize(
    ("ext", "message"),
    [(".nii", "not a NIfTI file"), (".nii.gz", "not a gzip-compressed file"), (".nrrd", "not an NRRD file"),
     (".zip", "corrupt ZIP file")],
)
@pytest.mark.parametrize("content", [b"hello, this is text\n" * 50, bytes(range(256)) * 40])
def test_text_or_random_bytes(tmp_path: Path, ext: str, message: str, content: bytes) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_volume(_write(tmp_path, "junk", content), ext)


def test_gzipped_text_as_nii_gz(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a NIfTI file"):
        check_volume(_write(tmp_path, "t", gzip.compress(b"just some text\n" * 100)), ".nii.gz")


def test_truncated_nii(nii: Path, tmp_path: Path) -> None:
    data = nii.read_bytes()
    with pytest.raises(InvalidArgument, match=r"truncated NIfTI file \(\.nii\): 1300 bytes, but the header declares 1792"):
        check_volume(_write(tmp_path, "t", data[:1300]), ".nii")
    with pytest.raises(InvalidArgument, match="header is incomplete"):
        check_volume(_write(tmp_path, "t", data[:200]), ".nii")


def test_nii_gz_compressing_a_truncated_volume(nii: Path, tmp_path: Path) -> None:
    """A well-formed gzip of too few bytes: only the trailer's ISIZE gives it away."""
    data = gzip.compress(nii.read_bytes()[:1000])
    with pytest.raises(InvalidArgument, match=r"gzip trailer says 1000 uncompressed bytes .* declares 1792"):
        check_volume(_write(tmp_path, "t", data), ".nii.gz")


def test_truncated_nii_gz(nii_gz: Path, tmp_path: Path) -> None:
    data = nii_gz.read_bytes()
    with pytest.raises(InvalidArgument, match="truncated or corrupt NIfTI file|corrupt gzip stream"):
        check_volume(_write(tmp_path, "t", data[: len(data) - 20]), ".nii.gz")
    with pytest.raises(InvalidArgument, match="corrupt gzip stream|truncated"):
        check_volume(_write(tmp_path, "t", data[:30]), ".nii.gz")


def test_broken_gzip_header(nii_gz: Path, tmp_path: Path) -> None:
    data = bytearray(nii_gz.read_bytes())
    data[2] = 99  # compression method must be 8 (deflate)
    with pytest.raises(InvalidArgument, match="corrupt gzip stream"):
        check_volume(_write(tmp_path, "t", bytes(data)), ".nii.gz")


def test_nii_with_bad_dims(nii: Path, tmp_path: Path) -> None:
    header = nib.load(nii).header.copy()
    header["dim"][2] = 0
    buf = io.BytesIO()
    header.write_to(buf)
    with pytest.raises(InvalidArgument, match="hold no voxels"):
        check_volume(_write(tmp_path, "t", buf.getvalue() + b"\0" * 4000), ".nii")


def test_truncated_nrrd_raw(nrrd_raw: Path, tmp_path: Path) -> None:
    data = nrrd_raw.read_bytes()
    with pytest.raises(InvalidArgument, match=r"truncated NRRD file \(\.nrrd\): \d+ bytes of raw data, but the header declares 1440"):
        check_volume(_write(tmp_path, "t", data[:-10]), ".nrrd")


def test_truncated_nrrd_gzip(nrrd_gz: Path, tmp_path: Path) -> None:
    data = nrrd_gz.read_bytes()
    with pytest.raises(InvalidArgument, match=r"truncated or corrupt NRRD file \(\.seg\.nrrd\)"):
        check_volume(_write(tmp_path, "t", data[:-25]), ".seg.nrrd")


def test_broken_nrrd_headers(nrrd_raw: Path, tmp_path: Path) -> None:
    text = nrrd_raw.read_bytes()
    header, _, body = text.partition(b"\n\n")
    no_type = b"\n".join(line for line in header.split(b"\n") if not line.startswith(b"type:"))
    with pytest.raises(InvalidArgument, match="invalid NRRD header.*'type'"):
        check_volume(_write(tmp_path, "t", no_type + b"\n\n" + body), ".nrrd")
    bad_sizes = header.replace(b"sizes: 8 9 10", b"sizes: 8 nine 10")
    with pytest.raises(InvalidArgument, match="invalid NRRD header"):
        check_volume(_write(tmp_path, "t", bad_sizes + b"\n\n" + body), ".nrrd")
    detached = header + b"\ndata file: v.raw"
    with pytest.raises(InvalidArgument, match="detached data files"):
        check_volume(_write(tmp_path, "t", detached + b"\n\n"), ".nrrd")
    with pytest.raises(InvalidArgument, match="not an NRRD file"):
        check_volume(_write(tmp_path, "t", b"NRR"), ".nrrd")


def test_zip_without_dicom(tmp_path: Path) -> None:
    path = tmp_path / "z.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.txt", "hello")
        archive.writestr("b.bin", bytes(range(256)) * 10)
    with pytest.raises(InvalidArgument, match="not a DICOM series"):
        check_volume(path, ".zip")
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w"):
        pass
    with pytest.raises(InvalidArgument, match="ZIP file is empty"):
        check_volume(empty, ".zip")


def test_corrupt_zip(dicom_zip: Path, tmp_path: Path) -> None:
    data = dicom_zip.read_bytes()
    with pytest.raises(InvalidArgument, match="corrupt ZIP file"):
        check_volume(_write(tmp_path, "t", data[: len(data) // 2]), ".zip")


def test_unknown_ext(nii: Path) -> None:
    with pytest.raises(InvalidArgument, match="unsupported format"):
        check_volume(nii, ".png")


def test_big_nii_gz_checked_without_decompressing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64 MiB volume: the check must read the header and trailer only."""
    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((256, 256, 256), np.float32), np.eye(4)), path)
    reads: list[int] = []
    real = gzip.GzipFile.read

    def counting(self: gzip.GzipFile, size: int = -1) -> bytes:
        data = real(self, size)
        reads.append(len(data))
        return data

    monkeypatch.setattr(gzip.GzipFile, "read", counting)
    assert check_volume(path, ".nii.gz").shape == (256, 256, 256)
    assert sum(reads) < 10_000
    assert formats.IMAGE_EXTS == (".nii.gz", ".nii", ".nrrd", ".zip")
