"""Which files the datastore accepts, and a cheap check that an upload is the volume it claims to be.

Why: MONAI Label stores whatever it is sent and fails later, in a training or inference job,
on a truncated or mislabelled file. We read headers only (and, for gzip, the trailer's
ISIZE field), so checking a 1 GB volume costs a few kilobytes of I/O. Only when ISIZE
disagrees (a truncated file, or a legal multi-member gzip such as bgzip's) is the stream
decompressed, in constant memory and never past the size the header declares, to tell
which.
"""

from __future__ import annotations

import gzip
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from services.common.errors import InvalidArgument

IMAGE_EXTS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".zip")
"""Image uploads: NIfTI, NRRD (a .seg.nrrd ends in .nrrd), or a ZIP of one DICOM series.

A bare .dcm is one slice, not a volume, and MONAI Label's studies folder does not list it:
zip the series instead.
"""

LABEL_EXTS: tuple[str, ...] = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd")
"""Label uploads: NIfTI or NRRD (including 3D Slicer's .seg.nrrd)."""

_GZIP_MAGIC = b"\x1f\x8b"
_READ_SIZE = 1024 * 1024
_FEED_SIZE = 16 * 1024  # input per zlib call: bounds one call's output (deflate expands ≤1032x)
_MAX_NRRD_HEADER = 1024 * 1024
_MAX_DICOM_MEMBERS_TRIED = 16


@dataclass(frozen=True)
class VolumeHeader:
    """What the header says: enough to reject nonsense and to log what was stored."""

    shape: tuple[int, ...]  # NIfTI/NRRD axis order (fastest first); DICOM: (rows, columns, files)
    dtype: str
    spacing: tuple[float, ...]


# -- names -----------------------------------------------------------------------------


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
    """The accepted image extension `file_name` ends with; InvalidArgument otherwise.

    MONAI Label's rule (the known extension the name ends with), case-sensitive as its
    folder scan is, so a stored file is always one MONAI Label lists.
    """
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


def _head(path: Path, size: int = 132) -> bytes:
    with open(path, "rb") as stream:
        return stream.read(size)


def _looks_like(head: bytes) -> str:
    """A hint on what a file that is not the claimed format is instead."""
    if head.startswith(_GZIP_MAGIC):
        return "; it is gzip-compressed data"
    if len(head) >= 4 and (head[:4] in (struct.pack("<i", 348), struct.pack(">i", 348), struct.pack("<i", 540))):
        return "; it is an uncompressed NIfTI file"
    if head.startswith(b"NRRD"):
        return "; it is an NRRD file"
    if head.startswith(b"PK\x03\x04"):
        return "; it is a ZIP archive"
    if head[128:132] == b"DICM":
        return "; it is a DICOM file (upload a series as a .zip)"
    sample = head[:64]
    if sample and all(32 <= b < 127 or b in b"\t\r\n" for b in sample):
        return f"; it looks like a text file starting {sample[:40].decode('ascii')!r}"
    return ""


# -- gzip ------------------------------------------------------------------------------


def _gzip_isize(path: Path, size: int) -> int:
    """The gzip trailer's ISIZE: the uncompressed size mod 2**32 (of the last member)."""
    with open(path, "rb") as stream:
        stream.seek(size - 4)
        return int.from_bytes(stream.read(4), "little")


def _gunzip_count(path: Path, start: int, limit: int) -> tuple[int, str | None]:
    """Decompresses every member from `start` until `limit` bytes come out, in constant memory.

    Returns (bytes produced, problem): problem is None when the data reached `limit` or
    every member ended cleanly, "truncated" when the file ends inside a member, else a
    description of the corruption. Trailing zero padding after the last member is allowed.
    """
    produced = 0
    decompressor = zlib.decompressobj(wbits=31)
    started = False
    with open(path, "rb") as stream:
        stream.seek(start)
        while chunk := stream.read(_READ_SIZE):
            for at in range(0, len(chunk), _FEED_SIZE):
                data = chunk[at : at + _FEED_SIZE]
                while data:
                    if not started and not data.strip(b"\x00"):
                        break  # zero padding between or after members
                    started = True
                    try:
                        produced += len(decompressor.decompress(data))
                    except zlib.error as exc:
                        return produced, f"corrupt gzip data after {produced} uncompressed bytes ({exc})"
                    if produced >= limit:
                        return produced, None
                    data = b""
                    if decompressor.eof:  # next member, if any
                        data = decompressor.unused_data
                        decompressor = zlib.decompressobj(wbits=31)
                        started = False
    return produced, ("truncated" if started else None)


def _check_gzip_size(path: Path, size: int, start: int, expected: int, what: str, declared: str) -> None:
    """Checks a gzip stream at `start` holds `expected` bytes: ISIZE first, a bounded gunzip if that disagrees."""
    if size - start < 18:
        raise _invalid(f"truncated {what}: {size - start} bytes of gzip data cannot even hold a gzip header and trailer")
    if _gzip_isize(path, size) == expected % 2**32:
        return
    produced, problem = _gunzip_count(path, start, expected)
    if problem == "truncated":
        raise _invalid(
            f"truncated {what}: the gzip stream breaks off after {produced} uncompressed bytes, "
            f"but the header declares {expected} ({declared})"
        )
    if problem is not None:
        raise _invalid(f"corrupt {what}: {problem}")
    if produced < expected:
        raise _invalid(
            f"truncated {what}: the data decompresses to {produced} bytes, "
            f"but the header declares {expected} ({declared})"
        )


# -- NIfTI -----------------------------------------------------------------------------


def _nifti_class(block: bytes, ext: str) -> Any:
    """Nifti1Header or Nifti2Header by the sizeof_hdr field (either byte order)."""
    import nibabel as nib  # imported lazily: only uploads need it

    if len(block) < 4:
        raise _invalid(f"not a NIfTI file ({ext}): only {len(block)} bytes of data")
    for endian in ("<", ">"):
        (sizeof_hdr,) = struct.unpack(endian + "i", block[:4])
        if sizeof_hdr == 348:
            return nib.Nifti1Header
        if sizeof_hdr == 540:
            return nib.Nifti2Header
    raise _invalid(
        f"not a NIfTI file ({ext}): the header size field is neither 348 (NIfTI-1) nor 540 (NIfTI-2)"
        + _looks_like(block)
    )


def _read_nifti_header(stream: BinaryIO, ext: str) -> tuple[VolumeHeader, int, int]:
    """(header, vox_offset, data bytes) from a stream positioned at the file start."""
    import io

    block = stream.read(540)
    klass = _nifti_class(block, ext)
    header_size = klass.template_dtype.itemsize
    if len(block) < header_size:
        raise _invalid(f"truncated NIfTI file ({ext}): the {header_size}-byte header is incomplete ({len(block)} bytes)")
    try:
        header = klass.from_fileobj(io.BytesIO(block[:header_size]), check=True)
    except Exception as exc:  # nibabel raises HeaderDataError, ValueError, KeyError ... on nonsense
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
    except Exception as exc:  # noqa: BLE001 - same: any failure is a bad header
        raise _invalid(f"invalid NIfTI header ({ext}): {exc}") from exc
    if not shape or any(d <= 0 for d in shape):
        raise _invalid(f"invalid NIfTI header ({ext}): dimensions {shape} hold no voxels")
    if vox_offset < header_size:
        raise _invalid(f"invalid NIfTI header ({ext}): vox_offset {vox_offset} points inside the header")
    nbytes = math.prod(shape) * dtype.itemsize
    return VolumeHeader(shape, dtype.name, spacing), vox_offset, nbytes


def _declared(header: VolumeHeader, vox_offset: int, nbytes: int) -> str:
    return f"{vox_offset}-byte header + {nbytes} bytes of {header.dtype} {header.shape}"


def _check_nifti_plain(path: Path, size: int) -> VolumeHeader:
    with open(path, "rb") as stream:
        header, vox_offset, nbytes = _read_nifti_header(stream, ".nii")
    if size < vox_offset + nbytes:
        raise _invalid(
            f"truncated NIfTI file (.nii): {size} bytes, but the header declares "
            f"{vox_offset + nbytes} ({_declared(header, vox_offset, nbytes)})"
        )
    return header


def _check_nifti_gz(path: Path, size: int) -> VolumeHeader:
    with open(path, "rb") as raw:
        head = raw.read(132)
        if not head.startswith(_GZIP_MAGIC):
            raise _invalid(
                "not a gzip-compressed file (.nii.gz): the gzip magic bytes 1f 8b are missing" + _looks_like(head)
            )
        raw.seek(0)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                header, vox_offset, nbytes = _read_nifti_header(stream, ".nii.gz")  # type: ignore[arg-type]
        except InvalidArgument:
            raise
        except (OSError, EOFError, ValueError, zlib.error) as exc:  # BadGzipFile, corrupt or truncated stream
            raise _invalid(f"corrupt gzip stream (.nii.gz): {exc}") from exc
    _check_gzip_size(path, size, 0, vox_offset + nbytes, "NIfTI file (.nii.gz)", _declared(header, vox_offset, nbytes))
    return header


# -- NRRD ------------------------------------------------------------------------------


def _nrrd_header_bytes(path: Path, ext: str) -> bytes:
    """The header up to and including its blank line; never reads more than 1 MiB."""
    with open(path, "rb") as stream:
        head = stream.read(_MAX_NRRD_HEADER)
    if not head.startswith(b"NRRD000"):
        raise _invalid(f"not an NRRD file ({ext}): it does not start with the magic 'NRRD000x'" + _looks_like(head))
    ends = [i + len(sep) for sep in (b"\n\n", b"\n\r\n") if (i := head.find(sep)) >= 0]
    if not ends:
        if len(head) == _MAX_NRRD_HEADER:
            raise _invalid(f"invalid NRRD header ({ext}): no blank line ends it within the first 1 MiB")
        raise _invalid(f"truncated NRRD file ({ext}): the header is not ended by a blank line, and no data follows")
    return head[: min(ends)]


def _parse_nrrd_header(raw: bytes, ext: str) -> dict[str, Any]:
    import nrrd  # imported lazily: only uploads need it

    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise _invalid(f"invalid NRRD header ({ext}): not ASCII text ({exc})") from exc
    try:
        return dict(nrrd.read_header(text.splitlines(keepends=True)))
    except Exception as exc:  # pynrrd raises NRRDError, ValueError ... on nonsense
        raise _invalid(f"invalid NRRD header ({ext}): {exc}") from exc


def _check_nrrd(path: Path, size: int, ext: str) -> VolumeHeader:
    from nrrd.reader import _determine_datatype  # noqa: PLC2701 - the one place pynrrd maps types

    raw_header = _nrrd_header_bytes(path, ext)
    header = _parse_nrrd_header(raw_header, ext)
    data_start = len(raw_header)
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
        line_skip = int(header.get("line skip", header.get("lineskip", 0)))
        byte_skip = int(header.get("byte skip", header.get("byteskip", 0)))
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad header
        raise _invalid(f"invalid NRRD header ({ext}): {exc}") from exc
    nbytes = math.prod(sizes) * dtype.itemsize
    volume = VolumeHeader(sizes, dtype.name, spacing)
    _check_nrrd_data(path, size, ext, str(header["encoding"]).lower(), data_start, nbytes, line_skip, byte_skip, volume)
    return volume


def _check_nrrd_data(
    path: Path,
    size: int,
    ext: str,
    encoding: str,
    data_start: int,
    nbytes: int,
    line_skip: int,
    byte_skip: int,
    volume: VolumeHeader,
) -> None:
    """Is the data all there? Exact for raw and gzip; magic bytes for bzip2; presence for text."""
    data_size = size - data_start
    declared = f"{volume.dtype} {volume.shape}"
    if line_skip:
        return  # skipped lines of unknown length: the header is all we can check cheaply
    if encoding == "raw":
        needed = nbytes + max(byte_skip, 0)
        if data_size < needed:
            raise _invalid(
                f"truncated NRRD file ({ext}): {data_size} bytes of raw data, but the header declares "
                f"{needed} ({declared})"
            )
    elif encoding in ("gzip", "gz"):
        with open(path, "rb") as stream:
            stream.seek(data_start)
            if stream.read(2) != _GZIP_MAGIC:
                raise _invalid(f"corrupt NRRD file ({ext}): gzip encoding declared, but the data is not gzip")
        if byte_skip >= 0:
            _check_gzip_size(path, size, data_start, nbytes + byte_skip, f"NRRD file ({ext})", declared)
    elif encoding in ("bzip2", "bz2"):
        with open(path, "rb") as stream:
            stream.seek(data_start)
            if stream.read(3) != b"BZh":
                raise _invalid(f"corrupt NRRD file ({ext}): bzip2 encoding declared, but the data is not bzip2")
    elif encoding not in ("ascii", "text", "txt", "hex"):
        raise _invalid(f"invalid NRRD header ({ext}): unsupported encoding {encoding!r}")
    elif data_size <= 0:
        raise _invalid(f"truncated NRRD file ({ext}): no data after the header")


def _nrrd_spacing(header: dict[str, Any], ndim: int) -> tuple[float, ...]:
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


def _unsafe_member(name: str) -> bool:
    """Names that would escape a folder the archive is extracted into (zip-slip)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


def _candidate_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """Files that may be DICOM: no folders, no macOS resource forks, no hidden files."""
    members = []
    for member in archive.infolist():
        if _unsafe_member(member.filename):
            raise _invalid(f"unsafe member name {member.filename!r} in the ZIP file: absolute paths and '..' are refused")
        base = member.filename.rstrip("/").rsplit("/", 1)[-1]
        if member.is_dir() or member.filename.startswith("__MACOSX/") or base.startswith("."):
            continue
        members.append(member)
    return members


def _read_dicom_image(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> Any:
    """The member's DICOM header if it is an image (has Rows and Columns); raises otherwise.

    Files without the 128-byte preamble and 'DICM' are legal DICOM too: read them with
    force, but then insist on SOPClassUID as well, so random bytes never pass.
    """
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        with archive.open(member) as stream:
            dataset = dcmread(stream, stop_before_pixels=True)
        required: tuple[str, ...] = ("Rows", "Columns")
    except InvalidDicomError:
        with archive.open(member) as stream:
            dataset = dcmread(stream, stop_before_pixels=True, force=True)
        required = ("SOPClassUID", "Rows", "Columns")
    missing = [name for name in required if name not in dataset]
    if missing:
        raise ValueError(f"not a DICOM image (no {', '.join(missing)})")
    return dataset


def _dicom_volume(dataset: Any, files: int) -> VolumeHeader:
    rows = int(dataset.get("Rows", 0) or 0)
    cols = int(dataset.get("Columns", 0) or 0)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    bits = int(dataset.get("BitsAllocated", 16) or 16)
    signed = int(dataset.get("PixelRepresentation", 0) or 0) == 1
    pixel = [float(v) for v in (dataset.get("PixelSpacing") or [1.0, 1.0])]
    thickness = float(dataset.get("SliceThickness", 1.0) or 1.0)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"image of {rows} x {cols} pixels")
    dtype = f"{'int' if signed else 'uint'}{bits}"
    return VolumeHeader((rows, cols, files * frames), dtype, (*pixel[:2], thickness))


def _check_dicom_zip(path: Path) -> VolumeHeader:
    try:
        with zipfile.ZipFile(path) as archive:
            members = _candidate_members(archive)
            if not members:
                raise _invalid("the ZIP file is empty: expected the files of one DICOM series")
            errors: list[str] = []
            for member in members[:_MAX_DICOM_MEMBERS_TRIED]:
                try:
                    return _dicom_volume(_read_dicom_image(archive, member), len(members))
                except Exception as exc:  # noqa: BLE001 - any member failure just means "try the next"
                    errors.append(f"{member.filename}: {exc}"[:200])
    except InvalidArgument:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise _invalid(f"corrupt ZIP file: {exc}" + _looks_like(_head(path))) from exc
    raise _invalid(
        "the ZIP file is not a DICOM series: none of the first "
        f"{min(len(members), _MAX_DICOM_MEMBERS_TRIED)} files is a DICOM image ({'; '.join(errors[:3])})"
    )


__all__ = [
    "IMAGE_EXTS",
    "LABEL_EXTS",
    "VolumeHeader",
    "check_volume",
    "image_ext_from_name",
    "label_ext_from_name",
]
