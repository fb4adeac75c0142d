"""Hostile volume files, built in the test itself: each one a class of attack on a reader.

Every builder returns (file name, bytes). `secret` is the absolute path of a file the test
planted on the server's disk: a file that makes any reader open it has broken the rule.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file

MIB = 1024 * 1024


def _nrrd_parts(encoding: str = "raw", shape: tuple[int, ...] = (4, 4, 4)) -> tuple[bytes, bytes]:
    """A valid NRRD's header (without its blank line) and its data."""
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "v.nrrd"
        nrrd.write(str(file), np.zeros(shape, np.uint8), {"encoding": encoding})
        header, _, body = file.read_bytes().partition(b"\n\n")
    return header, body


def nrrd_data_file(target: str, prefix: bytes = b"") -> tuple[str, bytes]:
    """`data file:` pointing at a server file; `prefix` before the field (\\x1c, \\r, ... bypassed
    a check that split lines with str.splitlines)."""
    header, _ = _nrrd_parts()
    return "attack.nrrd", header + b"\n" + prefix + b"data file: " + target.encode() + b"\n\n"


def nrrd_data_file_list(target: str) -> tuple[str, bytes]:
    header, _ = _nrrd_parts()
    return "attack.nrrd", header + b"\ndata file: LIST\n" + target.encode() + b"\n\n"


def nrrd_datafile_spelling(target: str) -> tuple[str, bytes]:
    header, _ = _nrrd_parts()
    return "attack.nrrd", header + b"\ndatafile:=" + target.encode() + b"\n\n"


def nrrd_non_ascii_field(target: str) -> tuple[str, bytes]:
    """pynrrd decodes with 'ignore': 'data\\xfffile' becomes 'datafile'."""
    header, _ = _nrrd_parts()
    return "attack.nrrd", header + b"\ndata\xfffile: " + target.encode() + b"\n\n"


def metaimage_element_data_file(target: str) -> tuple[str, bytes]:
    """MetaImage: the header names its data file (ITK would open it)."""
    header = f"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\nElementDataFile = {target}\n"
    return "attack.mhd", header.encode()


def nrrd_detached_header(target: str) -> tuple[str, bytes]:
    """A detached NRRD header (.nhdr): all it does is name a data file."""
    header, _ = _nrrd_parts()
    return "attack.nhdr", header + b"\ndata file: " + target.encode() + b"\n\n"


def analyze_header() -> tuple[str, bytes]:
    """An Analyze / NIfTI pair header (.hdr): its data lives in the .img next to it."""
    raw = bytearray(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)).to_bytes()[:348])
    raw[344:348] = b"ni1\x00"
    return "attack.hdr", bytes(raw)


def nifti_pair_magic() -> tuple[str, bytes]:
    """A .nii whose magic says header/image pair: its data would live in a .img next to it."""
    raw = bytearray(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)).to_bytes())
    raw[344:348] = b"ni1\x00"
    return "attack.nii", bytes(raw)


def _zeros_gzip(count: int, prefix: bytes, isize: int | None = None) -> bytes:
    """gzip of `prefix` + `count` zero bytes, built in 1 MiB steps; ISIZE optionally a lie."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(prefix)]
    block = bytes(MIB)
    for _ in range(count // MIB):
        parts.append(compressor.compress(block))
    parts.append(compressor.flush())
    data = bytearray(b"".join(parts))
    if isize is not None:
        data[-4:] = (isize % 2**32).to_bytes(4, "little")
    return bytes(data)


def nifti_gzip_bomb(expands_to: int = 64 * MIB) -> tuple[str, bytes]:
    """A tiny valid NIfTI, then hundreds of MiB of zeros in the same gzip stream; the trailer's
    ISIZE lies and says exactly the declared size."""
    nifti = nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)).to_bytes()
    return "bomb.nii.gz", _zeros_gzip(expands_to, nifti, isize=len(nifti))


def nrrd_gzip_bomb(expands_to: int = 64 * MIB) -> tuple[str, bytes]:
    """NRRD declaring 64 bytes of gzip data that inflates to hundreds of MiB (pynrrd inflates all)."""
    header, _ = _nrrd_parts("gzip")
    return "bomb.nrrd", header + b"\n\n" + _zeros_gzip(expands_to, bytes(64), isize=64)


def nrrd_bzip2_bomb(expands_to: int = 64 * MIB) -> tuple[str, bytes]:
    header, _ = _nrrd_parts("raw")
    header = header.replace(b"encoding: raw", b"encoding: bzip2")
    compressor = bz2.BZ2Compressor(9)
    parts = [compressor.compress(bytes(64))]
    block = bytes(MIB)
    for _ in range(expands_to // MIB):
        parts.append(compressor.compress(block))
    parts.append(compressor.flush())
    return "bomb.nrrd", header + b"\n\n" + b"".join(parts)


def nifti_huge_header(shape: tuple[int, int, int] = (1024, 1024, 1024)) -> tuple[str, bytes]:
    """A few KiB of .nii.gz whose header declares 1024^3 float32 (4 GiB once read)."""
    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).header.copy()
    header.set_data_shape(shape)
    header.set_data_offset(352)
    raw = header.binaryblock + b"\x00" * 4 + bytes(MIB)
    return "huge.nii.gz", gzip.compress(raw)


def nrrd_huge_sizes() -> tuple[str, bytes]:
    header, body = _nrrd_parts()
    return "huge.nrrd", header.replace(b"sizes: 4 4 4", b"sizes: 100000 100000 100000") + b"\n\n" + body


def nifti_wide_voxels() -> tuple[str, bytes]:
    """complex128: 16 bytes per voxel, over the per-voxel cap."""
    raw = nib.Nifti1Image(np.zeros((4, 4, 4), np.complex128), np.eye(4)).to_bytes()
    return "wide.nii", raw


def ct_small() -> str:
    """pydicom's CT_small.dcm test file (installed with pydicom, no download)."""
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    return path


def _dicom_with_private_element(size: int) -> bytes:
    dataset = dcmread(ct_small())
    dataset.add_new(0x00091010, "OB", bytes(size))
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def dicom_zip_huge_element(size: int = 256 * MIB) -> tuple[str, bytes]:
    """One DICOM holding a 256 MiB private element of zeros: a few hundred KiB zipped."""
    dataset = dcmread(ct_small())
    head = io.BytesIO()
    dataset.add_new(0x00091010, "OB", b"")
    dataset.save_as(head)
    raw = head.getvalue()
    # Patch the empty element's length to `size` and splice the zeros in, streaming into the zip.
    marker = struct.pack("<HH", 0x0009, 0x1010) + b"OB\x00\x00" + struct.pack("<I", 0)
    at = raw.index(marker)
    before, after = raw[:at], raw[at + len(marker) :]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("IM0001.dcm", "w", force_zip64=True) as member:
            member.write(before + marker[:8] + struct.pack("<I", size))
            block = bytes(MIB)
            for _ in range(size // MIB):
                member.write(block)
            member.write(after)
    return "bomb.zip", buffer.getvalue()


def dicom_zip_many_members(count: int = 20_001) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for number in range(count):
            archive.writestr(f"{number}", b"")
    return "many.zip", buffer.getvalue()


def dicom_zip_huge_rows() -> tuple[str, bytes]:
    """A real DICOM slice that says it is 65535 x 65535 with 10000 frames."""
    dataset = dcmread(ct_small())
    dataset.Rows = 65535
    dataset.Columns = 65535
    dataset.NumberOfFrames = 10000
    raw = io.BytesIO()
    dataset.save_as(raw)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("IM1.dcm", raw.getvalue())
    return "rows.zip", buffer.getvalue()


@functools.cache
def build(case: str, secret: str, missing: str) -> tuple[str, bytes]:
    """One catalogue file, built once per test session."""
    return catalogue(secret, missing)[case]()


def catalogue(secret: str, missing: str) -> dict[str, Callable[[], tuple[str, bytes]]]:
    """Every hostile file by case name (built lazily: some take a second)."""
    return {
        "nrrd-data-file": lambda: nrrd_data_file(secret),
        "nrrd-data-file-missing": lambda: nrrd_data_file(missing),
        "nrrd-data-file-x1c": lambda: nrrd_data_file(secret, b"\x1c"),
        "nrrd-data-file-cr": lambda: nrrd_data_file(secret, b"\r"),
        "nrrd-data-file-vt": lambda: nrrd_data_file(secret, b"\x0b"),
        "nrrd-data-file-ff": lambda: nrrd_data_file(secret, b"\x0c"),
        "nrrd-data-file-relative": lambda: nrrd_data_file("../../../../../../../../.." + secret),
        "nrrd-data-file-list": lambda: nrrd_data_file_list(secret),
        "nrrd-datafile-spelling": lambda: nrrd_datafile_spelling(secret),
        "nrrd-non-ascii-field": lambda: nrrd_non_ascii_field(secret),
        "nifti-pair-magic": nifti_pair_magic,
        "metaimage-element-data-file": lambda: metaimage_element_data_file(secret),
        "nrrd-detached-header": lambda: nrrd_detached_header(secret),
        "analyze-header": analyze_header,
        "nifti-gzip-bomb": nifti_gzip_bomb,
        "nrrd-gzip-bomb": nrrd_gzip_bomb,
        "nrrd-bzip2-bomb": nrrd_bzip2_bomb,
        "nifti-1024-cubed": nifti_huge_header,
        "nrrd-huge-sizes": nrrd_huge_sizes,
        "nifti-16-byte-voxels": nifti_wide_voxels,
        "dicom-zip-huge-element": dicom_zip_huge_element,
        "dicom-zip-many-members": dicom_zip_many_members,
        "dicom-zip-huge-rows": dicom_zip_huge_rows,
    }


VOLUME_CASES = [name for name in catalogue("/x", "/y") if not name.startswith("dicom-")]
"""What the volume reader (inference, scoring) can be handed: NIfTI and NRRD."""
