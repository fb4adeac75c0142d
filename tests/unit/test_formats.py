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

from services.common import formats
from services.common.errors import InvalidArgument
from services.datastore.domain.formats import VolumeHeader, check_volume, image_ext_from_name, label_ext_from_name

SHAPE = (8, 9, 10)


@pytest.mark.parametrize(
    ("name", "ext"),
    [
        ("a.nii.gz", ".nii.gz"),
        ("a.b.nii", ".nii"),
        ("ct.nrrd", ".nrrd"),
        ("series.zip", ".zip"),
        ("x.seg.nrrd", ".nrrd"),
    ],
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
    [
        (".nii", "not a NIfTI file"),
        (".nii.gz", "not a gzip-compressed file"),
        (".nrrd", "not an NRRD file"),
        (".zip", "corrupt ZIP file"),
    ],
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
    with pytest.raises(
        InvalidArgument, match=r"truncated NIfTI file \(\.nii\): 1300 bytes, but the header declares 1792"
    ):
        check_volume(_write(tmp_path, "t", data[:1300]), ".nii")
    with pytest.raises(InvalidArgument, match="header is incomplete"):
        check_volume(_write(tmp_path, "t", data[:200]), ".nii")


def test_nii_gz_compressing_a_truncated_volume(nii: Path, tmp_path: Path) -> None:
    """A well-formed gzip of too few bytes: only the trailer's ISIZE gives it away."""
    data = gzip.compress(nii.read_bytes()[:1000])
    with pytest.raises(InvalidArgument, match=r"the data decompresses to 1000 bytes, but the header declares 1792"):
        check_volume(_write(tmp_path, "t", data), ".nii.gz")


def test_truncated_nii_gz(nii_gz: Path, tmp_path: Path) -> None:
    data = nii_gz.read_bytes()
    with pytest.raises(InvalidArgument, match=r"truncated NIfTI file \(\.nii\.gz\): the gzip stream breaks off"):
        check_volume(_write(tmp_path, "t", data[: len(data) - 20]), ".nii.gz")
    with pytest.raises(InvalidArgument, match=r"corrupt gzip stream|truncated"):
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
    with pytest.raises(
        InvalidArgument, match=r"truncated NRRD file \(\.nrrd\): \d+ bytes of raw data, but the header declares 1440"
    ):
        check_volume(_write(tmp_path, "t", data[:-10]), ".nrrd")


def test_truncated_nrrd_gzip(nrrd_gz: Path, tmp_path: Path) -> None:
    data = nrrd_gz.read_bytes()
    with pytest.raises(InvalidArgument, match=r"truncated NRRD file \(\.seg\.nrrd\): the gzip stream breaks off"):
        check_volume(_write(tmp_path, "t", data[:-25]), ".seg.nrrd")


def test_broken_nrrd_headers(nrrd_raw: Path, tmp_path: Path) -> None:
    text = nrrd_raw.read_bytes()
    header, _, body = text.partition(b"\n\n")
    no_type = b"\n".join(line for line in header.split(b"\n") if not line.startswith(b"type:"))
    with pytest.raises(InvalidArgument, match=r"invalid NRRD header.*'type'"):
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


def test_big_nii_gz_is_accepted(tmp_path: Path) -> None:
    """A 64 MiB volume: the whole stream is decompressed (in constant memory) and matches its header."""
    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((256, 256, 256), np.float32), np.eye(4)), path)
    assert check_volume(path, ".nii.gz").shape == (256, 256, 256)
    assert formats.IMAGE_EXTS == (".nii.gz", ".nii", ".nrrd", ".zip")


# -- gzip: always decompressed, never past the declared size (ISIZE is never trusted) ----------


def test_multi_member_gzip_nii_gz_is_accepted(nii: Path, tmp_path: Path) -> None:
    """Concatenated gzip members are legal (pigz -i, cat a.gz b.gz): ISIZE covers only the last."""
    data = nii.read_bytes()
    multi = gzip.compress(data[:700]) + gzip.compress(data[700:])
    assert check_volume(_write(tmp_path, "m.nii.gz", multi), ".nii.gz").shape == SHAPE


def test_bgzf_style_gzip_is_accepted(nii: Path, tmp_path: Path) -> None:
    """bgzip ends with an empty member (ISIZE 0), and some writers pad with zeros."""
    data = gzip.compress(nii.read_bytes()) + gzip.compress(b"") + b"\x00" * 512
    assert check_volume(_write(tmp_path, "b.nii.gz", data), ".nii.gz").shape == SHAPE


def test_corrupt_deflate_data_is_refused(nii_gz: Path, tmp_path: Path) -> None:
    data = bytearray(nii_gz.read_bytes())
    data[-8:-4] = b"\xff\xff\xff\xff"  # CRC
    data[-4:] = (0).to_bytes(4, "little")  # ISIZE disagrees, so the stream is decompressed
    with pytest.raises(InvalidArgument, match=r"corrupt NIfTI file \(\.nii\.gz\): corrupt gzip data"):
        check_volume(_write(tmp_path, "c.nii.gz", bytes(data)), ".nii.gz")


@pytest.mark.parametrize("isize", ["true", "declared"])
def test_data_beyond_the_declared_size_is_a_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isize: str) -> None:
    """128 MiB behind a 256 KiB volume is refused, and decompression stops just past the declared
    size, whatever the trailer's ISIZE says (here also a lie that matches the header)."""
    volume = np.zeros((64, 64, 64), np.uint8)
    nifti = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    data = bytearray(gzip.compress(nifti + b"\x00" * (128 * 1024 * 1024), compresslevel=1))
    if isize == "declared":
        data[-4:] = len(nifti).to_bytes(4, "little")
    path = _write(tmp_path, "j.nii.gz", bytes(data))
    produced: list[int] = []
    real = formats._inflate_count

    def spy(*args: object) -> tuple[int, str | None]:
        result = real(*args)  # type: ignore[arg-type]
        produced.append(result[0])
        return result

    monkeypatch.setattr(formats, "_inflate_count", spy)
    with pytest.raises(InvalidArgument, match="decompression bomb"):
        check_volume(path, ".nii.gz")
    assert produced and produced[0] <= len(nifti) + 2 * 1024 * 1024


def test_wrong_suffix_hints(nii: Path, nii_gz: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="gzip-compressed data"):
        check_volume(nii_gz, ".nii")
    with pytest.raises(InvalidArgument, match="uncompressed NIfTI file"):
        check_volume(nii, ".nii.gz")
    with pytest.raises(InvalidArgument, match="looks like a text file starting 'hello"):
        check_volume(_write(tmp_path, "t", b"hello, this is text\n" * 50), ".nii")


# -- NRRD headers are read with a bound --------------------------------------------------------


def test_nrrd_header_without_end(tmp_path: Path) -> None:
    endless = _write(tmp_path, "e.nrrd", b"NRRD0004\n" + b"x" * (2 * 1024 * 1024))
    with pytest.raises(InvalidArgument, match="no blank line ends it within the first 1 MiB"):
        check_volume(endless, ".nrrd")
    cut = _write(tmp_path, "c.nrrd", b"NRRD0004\ntype: short\n")
    with pytest.raises(InvalidArgument, match="not ended by a blank line"):
        check_volume(cut, ".nrrd")


def test_nrrd_non_ascii_header(nrrd_raw: Path, tmp_path: Path) -> None:
    data = nrrd_raw.read_bytes().replace(b"type:", "typ\u00e9:".encode(), 1)
    with pytest.raises(InvalidArgument, match="non-ASCII byte"):
        check_volume(_write(tmp_path, "u.nrrd", data), ".nrrd")


def test_nrrd_gzip_multi_member(volume: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "v.nrrd"
    nrrd.write(str(path), volume, {"encoding": "raw"})
    header, _, body = path.read_bytes().partition(b"\n\n")
    header = header.replace(b"encoding: raw", b"encoding: gzip")
    data = header + b"\n\n" + gzip.compress(body[:100]) + gzip.compress(body[100:])
    assert check_volume(_write(tmp_path, "m.nrrd", data), ".nrrd").shape == SHAPE


# -- DICOM ZIPs --------------------------------------------------------------------------------


def test_dicom_without_preamble_is_accepted(tmp_path: Path) -> None:
    raw = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    path = tmp_path / "np.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("IM1", raw[132:])  # no 128-byte preamble, no 'DICM'
    assert check_volume(path, ".zip").shape[:2] == (128, 128)


def test_dicomdir_alone_is_not_a_series(tmp_path: Path) -> None:
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(get_testdata_file("DICOMDIR"), "DICOMDIR")
    with pytest.raises(InvalidArgument, match=r"is a DICOM image \(DICOMDIR: not a DICOM image \(no Rows, Columns\)\)"):
        check_volume(path, ".zip")


def test_zip_junk_is_skipped_and_counted_out(tmp_path: Path) -> None:
    path = tmp_path / "mac.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("__MACOSX/series/._IM1.dcm", b"\x00\x05\x16\x07 resource fork")
        archive.writestr("series/.DS_Store", b"junk")
        for number in range(3):
            archive.write(get_testdata_file("CT_small.dcm"), f"series/IM{number}.dcm")
    assert check_volume(path, ".zip").shape == (128, 128, 3)


@pytest.mark.parametrize("name", ["../evil.dcm", "/abs.dcm", "a/../../b.dcm", "C:/x.dcm", "..\\x.dcm"])
def test_zip_slip_names_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "slip.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(get_testdata_file("CT_small.dcm"), "ok.dcm")
        archive.writestr(name, b"x")
    with pytest.raises(InvalidArgument, match="unsafe member name"):
        check_volume(path, ".zip")


# -- limits: sizes from the header, before anything is allocated ------------------------------


def test_limits_come_from_the_header(tmp_path: Path, nii: Path) -> None:
    small = formats.VolumeLimits(max_voxels=100)
    with pytest.raises(InvalidArgument, match=r"720 voxels \(8, 9, 10\), over the limit of 100"):
        check_volume(nii, ".nii", small)
    with pytest.raises(InvalidArgument, match="bytes of data, over the limit of 1000"):
        check_volume(nii, ".nii", formats.VolumeLimits(max_bytes=1000))
    assert formats.VolumeLimits.from_env({"LABELGRID_MAX_VOLUME_VOXELS": "100"}).max_voxels == 100
    with pytest.raises(ValueError, match="positive integer"):
        formats.VolumeLimits.from_env({"LABELGRID_MAX_VOLUME_BYTES": "-5"})


def test_raw_nrrd_must_hold_exactly_the_declared_data(nrrd_raw: Path, tmp_path: Path) -> None:
    """pynrrd reads everything after the header: one byte more and no reader could open it."""
    with pytest.raises(InvalidArgument, match="bytes of raw data, but the header declares"):
        check_volume(_write(tmp_path, "x.nrrd", nrrd_raw.read_bytes() + b"\0"), ".nrrd")


def test_dicom_with_a_large_element_is_read_without_loading_it(tmp_path: Path) -> None:
    """A 24 MiB private element (stored, so no ratio alarm): skipped by the header read, which keeps
    only the tags it needs, so checking it allocates next to nothing."""
    import tracemalloc

    from pydicom import dcmread

    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    dataset.add_new(0x00091010, "OB", bytes(24 * 1024 * 1024))
    raw = io.BytesIO()
    dataset.save_as(raw)
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("IM1.dcm", raw.getvalue())
    del dataset, raw
    tracemalloc.start()
    try:
        assert check_volume(path, ".zip").shape == (128, 128, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


def test_dicom_header_reads_are_budgeted(tmp_path: Path) -> None:
    """A header that keeps reading (here a long undefined-length sequence) stops at the budget."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    item = Dataset()
    item.add_new(0x00091011, "OB", bytes(1024))
    dataset.add_new(0x00091012, "SQ", Sequence([item] * 12_000))  # about 12 MiB of items
    dataset[0x00091012].is_undefined_length = True
    raw = io.BytesIO()
    dataset.save_as(raw)
    path = tmp_path / "seq.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("IM1.dcm", raw.getvalue())
    with pytest.raises(InvalidArgument, match="DICOM header is larger than"):
        check_volume(path, ".zip")
