"""Which files the datastore accepts, and a cheap check that an upload is the volume it claims to be.

Why: MONAI Label stores whatever it is sent and fails later, in a training or inference job,
on a truncated or mislabelled file. We read only headers (and, for gzip, the trailer's
ISIZE field), so checking a 1 GB volume costs a few kilobytes of I/O, never a full
decompression.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from services.common.errors import InvalidArgument

IMAGE_EXTS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".zip")
"""Image uploads: NIfTI, NRRD, or a ZIP of one DICOM series."""

LABEL_EXTS: tuple[str, ...] = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd")
"""Label uploads: NIfTI or NRRD (including 3D Slicer's .seg.nrrd)."""

_GZIP_MAGIC = b"\x1f\x8b"
_MAX_DICOM_MEMBERS_TRIED = 16


@dataclass(frozen=True)
class VolumeHeader:
    """What the header says: enough to reject nonsense and to log what was stored."""

    shape: tuple[int, ...]
    dtype: str
    spacing: tuple[float, ...]


def _ext_from_name(file_name: str, exts: tuple[str, ...], what: str) -> str:
    for ext in sorted(exts, key=len, reverse=True):
        if file_name.endswith(ext):
            return ext
    hint = ""
    lowered = file_name.lower()
    if any(lowered.endswith(ext) for ext in exts):
        hint = " (extensions are case-sensitive, as in MONAI Label: use lower case)"
    raise InvalidArgument(
        f"unsupported {what} file name {file_name!r}: accepted formats are {', '.join(exts)}{hint}"
    )


def image_ext_from_name(file_name: str) -> str:
    """The accepted image extension `file_name` ends with; InvalidArgument otherwise."""
    return _ext_from_name(file_name, IMAGE_EXTS, "image")


def label_ext_from_name(file_name: str) -> str:
    """The accepted label extension `file_name` ends with (longest match, so .seg.nrrd wins)."""
    return _ext_from_name(file_name, LABEL_EXTS, "label")


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_INPUT")


def check_volume(path: Path, ext: str) -> VolumeHeader:
    """Reads the header of `path` as format `ext` and checks the data is all there.

    Raises InvalidArgument (reason INVALID_INPUT) with a message saying what is wrong.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _invalid(f"cannot read the uploaded file: {exc}") from exc
    if size == 0:
        raise _invalid(f"the uploaded file is empty (0 bytes); expected a {ext} file")
    if ext == ".nii":
        return _check_nifti_plain(path, size)
    if ext == ".nii.gz":
        return _check_nifti_gz(path, size)
    if ext in (".nrrd", ".seg.nrrd"):
        return _check_nrrd(path, size, ext)
    if ext == ".zip":
        return _check_dicom_zip(path)
    accepted = ", ".join(dict.fromkeys(IMAGE_EXTS + LABEL_EXTS))
    raise _invalid(f"unsupported format {ext!r}: accepted formats are {accepted}")


# -- NIfTI -----------------------------------------------------------------------------


def _read_nifti_header(stream: BinaryIO, ext: str) -> tuple[VolumeHeader, int, int]:
    """(header, vox_offset, data bytes) from a stream positioned at the file start."""
    import nibabel as nib  # imported lazily: only uploads need it

    head = stream.read(4)
    if len(head) < 4:
        raise _invalid(f"not a NIfTI file ({ext}): only {len(head)} bytes before the end of the data")
    klass: type[nib.Nifti1Header] | None = None
    for endian in ("<", ">"):
        (sizeof_hdr,) = struct.unpack(endian + "i", head)
        if sizeof_hdr == 348:
            klass = nib.Nifti1Header
        elif sizeof_hdr == 540:
            klass = nib.Nifti2Header
        if klass is not None:
            break
    if klass is None:
        raise _invalid(f"not a NIfTI file ({ext}): the header size field is neither 348 (NIfTI-1) nor 540 (NIfTI-2)")
    rest = stream.read(klass.template_dtype.itemsize - 4)
    if len(rest) < klass.template_dtype.itemsize - 4:
        raise _invalid(f"truncated NIfTI file ({ext}): the {klass.template_dtype.itemsize}-byte header is incomplete")
    try:
        header = klass.from_fileobj(io.BytesIO(head + rest), check=True)
    except Exception as exc:
        raise _invalid(f"invalid NIfTI header ({ext}): {exc}") from exc
    magic = bytes(header["magic"]).rstrip(b"\x00")
    if magic not in (b"n+1", b"n+2"):
        if magic in (b"ni1", b"ni2"):
            raise _invalid(f"NIfTI header/image pair (.hdr/.img) is not supported as {ext}: upload a single-file NIfTI")
        raise _invalid(f"not a NIfTI file ({ext}): bad magic {magic!r}")
    try:
        shape = tuple(int(d) for d in header.get_data_shape())
        dtype = header.get_data_dtype()
        spacing = tuple(float(z) for z in header.get_zooms())
        vox_offset = int(header.get_data_offset())
    except Exception as exc:
        raise _invalid(f"invalid NIfTI header ({ext}): {exc}") from exc
    if not shape or any(d <= 0 for d in shape):
        raise _invalid(f"invalid NIfTI header ({ext}): dimensions {shape} hold no voxels")
    if vox_offset < klass.template_dtype.itemsize:
        raise _invalid(f"invalid NIfTI header ({ext}): vox_offset {vox_offset} points inside the header")
    nbytes = math.prod(shape) * dtype.itemsize
    return VolumeHeader(shape, dtype.name, spacing), vox_offset, nbytes


def _check_nifti_plain(path: Path, size: int) -> VolumeHeader:
    with open(path, "rb") as stream:
        header, vox_offset, nbytes = _read_nifti_header(stream, ".nii")
    if size < vox_offset + nbytes:
        raise _invalid(
            f"truncated NIfTI file (.nii): {size} bytes, but the header declares "
            f"{vox_offset + nbytes} ({vox_offset}-byte header + {nbytes} bytes of {header.dtype} {header.shape})"
        )
    return header


def _gzip_isize(path: Path, size: int, what: str) -> int:
    """The gzip trailer's ISIZE: the uncompressed size mod 2**32 (of the last member)."""
    if size < 18:
        raise _invalid(f"truncated gzip stream ({what}): {size} bytes is shorter than a gzip header and trailer")
    with open(path, "rb") as stream:
        stream.seek(size - 4)
        return int.from_bytes(stream.read(4), "little")


def _is_bgzf(path: Path) -> bool:
    """BGZF (bgzip) files are many gzip members; ISIZE then covers only the last, empty one."""
    with open(path, "rb") as stream:
        head = stream.read(18)
    return len(head) >= 16 and head[3] & 0x04 != 0 and head[12:14] == b"BC"


def _check_nifti_gz(path: Path, size: int) -> VolumeHeader:
    with open(path, "rb") as raw:
        if raw.read(2) != _GZIP_MAGIC:
            raise _invalid("not a gzip-compressed file (.nii.gz): the gzip magic bytes 1f 8b are missing")
        raw.seek(0)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                header, vox_offset, nbytes = _read_nifti_header(stream, ".nii.gz")  # type: ignore[arg-type]
        except InvalidArgument:
            raise
        except (OSError, EOFError, ValueError) as exc:  # BadGzipFile, zlib.error, truncated stream
            raise _invalid(f"corrupt gzip stream (.nii.gz): {exc}") from exc
    expected = vox_offset + nbytes
    if not _is_bgzf(path):
        isize = _gzip_isize(path, size, ".nii.gz")
        if isize != expected % 2**32:
            raise _invalid(
                f"truncated or corrupt NIfTI file (.nii.gz): the gzip trailer says {isize} uncompressed bytes "
                f"(mod 2^32), but the header declares {expected} ({vox_offset}-byte header + {nbytes} bytes of "
                f"{header.dtype} {header.shape})"
            )
    return header


# -- NRRD ------------------------------------------------------------------------------


def _check_nrrd(path: Path, size: int, ext: str) -> VolumeHeader:
    import nrrd  # imported lazily: only uploads need it
    from nrrd.reader import _determine_datatype  # noqa: PLC2701 - the one place pynrrd maps types

    with open(path, "rb") as stream:
        if stream.read(4) != b"NRRD":
            raise _invalid(f"not an NRRD file ({ext}): it does not start with the magic 'NRRD000x'")
        stream.seek(0)
        try:
            header = nrrd.read_header(stream)
            data_start = stream.tell()
        except Exception as exc:
            raise _invalid(f"invalid NRRD header ({ext}): {exc}") from exc
    try:
        for field in ("type", "dimension", "sizes", "encoding"):
            if field not in header:
                raise ValueError(f"missing required field {field!r}")
        sizes = tuple(int(s) for s in header["sizes"])
        if int(header["dimension"]) != len(sizes):
            raise ValueError(f"dimension {header['dimension']} does not match sizes {sizes}")
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"sizes {sizes} hold no voxels")
        if "data file" in header or "datafile" in header:
            raise ValueError("detached data files are not supported: upload an NRRD with the data attached")
        dtype = _determine_datatype(header)
        spacing = _nrrd_spacing(header, len(sizes))
    except Exception as exc:
        raise _invalid(f"invalid NRRD header ({ext}): {exc}") from exc
    nbytes = math.prod(sizes) * dtype.itemsize
    volume = VolumeHeader(sizes, dtype.name, spacing)
    encoding = str(header["encoding"]).lower()
    line_skip = int(header.get("line skip", header.get("lineskip", 0)))
    byte_skip = int(header.get("byte skip", header.get("byteskip", 0)))
    data_size = size - data_start
    if encoding == "raw":
        needed = nbytes + max(byte_skip, 0)
        if line_skip == 0 and data_size < needed:
            raise _invalid(
                f"truncated NRRD file ({ext}): {data_size} bytes of raw data, but the header declares "
                f"{needed} ({dtype.name} {sizes})"
            )
    elif encoding in ("gzip", "gz"):
        if line_skip == 0:
            with open(path, "rb") as stream:
                stream.seek(data_start)
                if stream.read(2) != _GZIP_MAGIC:
                    raise _invalid(f"corrupt NRRD file ({ext}): gzip encoding declared, but the data is not gzip")
            isize = _gzip_isize(path, size, ext) if data_size >= 18 else -1
            expected = (nbytes + max(byte_skip, 0)) % 2**32
            if isize != expected and byte_skip >= 0:
                raise _invalid(
                    f"truncated or corrupt NRRD file ({ext}): the gzip trailer says {isize} uncompressed bytes "
                    f"(mod 2^32), but the header declares {nbytes} ({dtype.name} {sizes})"
                )
    elif encoding in ("bzip2", "bz2"):
        with open(path, "rb") as stream:
            stream.seek(data_start)
            if line_skip == 0 and stream.read(3) != b"BZh":
                raise _invalid(f"corrupt NRRD file ({ext}): bzip2 encoding declared, but the data is not bzip2")
    elif encoding not in ("ascii", "text", "txt"):
        raise _invalid(f"invalid NRRD header ({ext}): unsupported encoding {header['encoding']!r}")
    elif data_size <= 0:
        raise _invalid(f"truncated NRRD file ({ext}): no data after the header")
    return volume


def _nrrd_spacing(header: dict, ndim: int) -> tuple[float, ...]:
    if "spacings" in header:
        return tuple(float(s) for s in header["spacings"])
    directions = header.get("space directions")
    if directions is not None:
        spacing = []
        for row in directions:
            try:
                spacing.append(float(math.sqrt(sum(float(v) ** 2 for v in row))))
            except (TypeError, ValueError):
                spacing.append(float("nan"))  # a 'none' axis (e.g. segment layers)
        return tuple(spacing)
    return tuple(1.0 for _ in range(ndim))


# -- DICOM series in a ZIP -------------------------------------------------------------


def _check_dicom_zip(path: Path) -> VolumeHeader:
    from pydicom import dcmread  # imported lazily: only uploads need it

    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if not members:
                raise _invalid("the ZIP file is empty: expected the files of one DICOM series")
            errors: list[str] = []
            for member in members[:_MAX_DICOM_MEMBERS_TRIED]:
                try:
                    with archive.open(member) as stream:
                        dataset = dcmread(stream, stop_before_pixels=True)
                    if "SOPClassUID" not in dataset and "Rows" not in dataset:
                        raise ValueError("no SOPClassUID and no Rows")
                except Exception as exc:  # noqa: BLE001 - any member failure just means "try the next"
                    errors.append(f"{member.filename}: {type(exc).__name__}")
                    continue
                rows = int(dataset.get("Rows", 0) or 0)
                cols = int(dataset.get("Columns", 0) or 0)
                bits = int(dataset.get("BitsAllocated", 16) or 16)
                signed = int(dataset.get("PixelRepresentation", 0) or 0) == 1
                pixel = [float(v) for v in dataset.get("PixelSpacing", [1.0, 1.0])]
                thickness = float(dataset.get("SliceThickness", 1.0) or 1.0)
                dtype = f"{'int' if signed else 'uint'}{bits}"
                return VolumeHeader((rows, cols, len(members)), dtype, (*pixel[:2], thickness))
    except InvalidArgument:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise _invalid(f"corrupt ZIP file: {exc}") from exc
    raise _invalid(
        "the ZIP file is not a DICOM series: none of the first "
        f"{min(len(members), _MAX_DICOM_MEMBERS_TRIED)} files parse as DICOM ({'; '.join(errors[:3])})"
    )


__all__ = [
    "IMAGE_EXTS",
    "LABEL_EXTS",
    "VolumeHeader",
    "check_volume",
    "image_ext_from_name",
    "label_ext_from_name",
]
