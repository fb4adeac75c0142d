"""Which volume files labelgrid accepts, and the one check every entry point runs on them.

Every file a client sends is hostile. Datastore uploads (images, labels, session files), infer
uploads and the volume reader itself (`services.common.models.volumes`, used by inference and
scoring) all call `check_volume` before any reader touches the bytes, so one rule holds
everywhere:

- No indirection: a header may never make a reader open another file. NRRD `data file:` (and
  its `LIST` form) is refused, NIfTI header/image pairs (.hdr/.img magic) are refused, and no
  other format (MetaImage's `ElementDataFile`, Analyze) is accepted at all.
- The check reads the NRRD header exactly as pynrrd does (lines split on `\n` only) and refuses
  any control byte or non-ASCII byte in it, so no line can look different to the two
  (`\x1cdata file: /etc/hostname`, also with `\r`, `\x0b`, `\x0c`).
- No bombs: voxels, bytes per voxel and the expanded size are capped from the header before
  anything is allocated (`VolumeLimits`). Compressed data is stream-decompressed in constant
  memory and never past the declared size plus a little slack; the gzip trailer's ISIZE is
  never trusted. DICOM ZIPs are capped in members, member size and compression ratio, and each
  member's header is read with skipped large elements and a byte budget.
"""

from __future__ import annotations

import bz2
import gzip
import io
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping
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
_MAX_HEADER_SKIP = 64 * 1024 * 1024  # vox_offset / byte skip beyond the data itself
_GZIP_SLACK = 1024 * 1024  # trailing bytes tolerated after the declared data (padding)
_DICOM_HEADER_READ_BUDGET = 8 * 1024 * 1024  # bytes one member's header may read into memory
_DICOM_TAGS = (
    "SOPClassUID", "Rows", "Columns", "NumberOfFrames", "BitsAllocated",
    "PixelRepresentation", "PixelSpacing", "SliceThickness",
)  # fmt: skip
_CONTROL_OK = frozenset(b"\t\n")


@dataclass(frozen=True)
class VolumeLimits:
    """Caps taken from the header before anything is allocated or decompressed.

    Defaults fit a 512 x 512 x 2048 CT. Every service takes the same settings
    (max_volume_voxels, max_volume_bytes: env LABELGRID_MAX_VOLUME_VOXELS / _BYTES or flags
    --max-volume-voxels / --max-volume-bytes; GrpcService.start applies them with
    `configure_limits`), so the datastore never stores a volume that inference or scoring would
    then refuse to read.
    """

    max_voxels: int = 2**29
    max_bytes: int = 2 * 1024**3  # the data as the header declares it, uncompressed
    max_bytes_per_voxel: int = 8
    max_zip_members: int = 20_000
    max_zip_member_bytes: int = 1024**3
    max_zip_ratio: int = 200  # uncompressed / compressed, for members over 1 MiB

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> VolumeLimits:
        def number(name: str, default: int) -> int:
            value = environ.get(name, "").strip()
            if not value:
                return default
            if not value.isdigit() or int(value) <= 0:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
            return int(value)

        return cls(
            max_voxels=number("LABELGRID_MAX_VOLUME_VOXELS", cls.max_voxels),
            max_bytes=number("LABELGRID_MAX_VOLUME_BYTES", cls.max_bytes),
        )


DEFAULT_LIMITS = VolumeLimits.from_env()
_limits = DEFAULT_LIMITS


def configure_limits(limits: VolumeLimits) -> None:
    """Makes `limits` the caps of every check that is not given its own (a service's settings,
    applied once at start)."""
    global _limits
    _limits = limits


def current_limits() -> VolumeLimits:
    """The caps in force: the service's settings once started, else the env vars' (or defaults)."""
    return _limits


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
    raise InvalidArgument(f"unsupported {what} file name {file_name!r}: accepted formats are {', '.join(exts)}{hint}")


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


def check_volume(path: Path, ext: str, limits: VolumeLimits | None = None) -> VolumeHeader:
    """Reads the header of `path` as format `ext`, refuses what the module doc lists, and
    checks the data is all there (and no more).

    Raises InvalidArgument (reason INVALID_INPUT) with a message saying what is wrong; the
    message never names a server path.
    """
    limits = limits or current_limits()
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise _invalid("cannot read the uploaded file") from None
    if size == 0:
        raise _invalid(f"the uploaded file is empty (0 bytes); expected a {ext} file")
    if ext == ".nii":
        return _check_nifti_plain(path, size, limits)
    if ext == ".nii.gz":
        return _check_nifti_gz(path, size, limits)
    if ext in (".nrrd", ".seg.nrrd"):
        return _check_nrrd(path, size, ext, limits)
    if ext == ".zip":
        return _check_dicom_zip(path, limits)
    accepted = ", ".join(dict.fromkeys(IMAGE_EXTS + LABEL_EXTS))
    raise _invalid(f"unsupported format {ext!r}: accepted formats are {accepted}")


def _check_limits(shape: tuple[int, ...], itemsize: int, skip: int, what: str, limits: VolumeLimits) -> int:
    """The data bytes the header declares; refuses sizes over the limits before anything is allocated."""
    voxels = math.prod(shape)
    if voxels > limits.max_voxels:
        raise _invalid(f"{what}: the header declares {voxels} voxels {shape}, over the limit of {limits.max_voxels}")
    if itemsize > limits.max_bytes_per_voxel:
        raise _invalid(f"{what}: {itemsize} bytes per voxel is over the limit of {limits.max_bytes_per_voxel}")
    nbytes = voxels * itemsize
    if nbytes > limits.max_bytes:
        raise _invalid(f"{what}: the header declares {nbytes} bytes of data, over the limit of {limits.max_bytes}")
    if skip > _MAX_HEADER_SKIP:
        raise _invalid(f"{what}: the data starts {skip} bytes in, over the limit of {_MAX_HEADER_SKIP}")
    return nbytes


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


# -- compressed data: always stream-decompressed, never past a cap ------------------------


def _inflate_count(path: Path, start: int, limit: int, kind: str = "gzip") -> tuple[int, str | None]:
    """Decompresses every member from `start` in constant memory, stopping once more than `limit`
    bytes came out (the trailer's sizes are never trusted).

    Returns (bytes produced, problem): problem is None when the data ran past `limit` or every
    member ended cleanly, "truncated" when the file ends inside a member, else a description of
    the corruption. Zero padding between and after members is allowed.
    """
    make: Any = (lambda: zlib.decompressobj(wbits=31)) if kind == "gzip" else bz2.BZ2Decompressor
    produced = 0
    decompressor = make()
    started = False
    with open(path, "rb") as stream:
        stream.seek(start)
        while chunk := stream.read(_FEED_SIZE):
            data = chunk
            while True:
                if not started:
                    if not data.strip(b"\x00"):
                        break  # zero padding between or after members
                    started = True
                try:
                    produced += len(decompressor.decompress(data, _READ_SIZE))
                except (zlib.error, OSError, EOFError, ValueError) as exc:
                    return produced, f"corrupt {kind} data after {produced} uncompressed bytes ({exc})"
                if produced > limit:
                    return produced, None
                if decompressor.eof:  # next member, if any
                    data = decompressor.unused_data
                    decompressor = make()
                    started = False
                    if not data:
                        break
                elif kind == "gzip":
                    data = decompressor.unconsumed_tail
                    if not data:
                        break
                elif decompressor.needs_input:
                    break
                else:
                    data = b""  # bz2 holds more output for this input
    return produced, ("truncated" if started else None)


def _check_compressed_size(
    path: Path, size: int, start: int, expected: int, what: str, declared: str, kind: str = "gzip", most: int = -1
) -> None:
    """Checks a compressed stream at `start` expands to at least `expected` bytes and to no more
    than `most` (default: `expected` plus a little padding); a bomb stops at that cap."""
    most = expected + _GZIP_SLACK if most < 0 else most
    if kind == "gzip" and size - start < 18:
        raise _invalid(
            f"truncated {what}: {size - start} bytes of gzip data cannot even hold a gzip header and trailer"
        )
    produced, problem = _inflate_count(path, start, most, kind)
    if problem == "truncated":
        raise _invalid(
            f"truncated {what}: the {kind} stream breaks off after {produced} uncompressed bytes, "
            f"but the header declares {expected} ({declared})"
        )
    if problem is not None:
        raise _invalid(f"corrupt {what}: {problem}")
    if produced > most:
        raise _invalid(
            f"{what}: the compressed data expands to more than {most} bytes, but the header declares "
            f"{expected} ({declared}); refused as a decompression bomb"
        )
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


def _read_nifti_header(stream: BinaryIO, ext: str, limits: VolumeLimits) -> tuple[VolumeHeader, int, int]:
    """(header, vox_offset, data bytes) from a stream positioned at the file start."""
    block = stream.read(540)
    klass = _nifti_class(block, ext)
    header_size = klass.template_dtype.itemsize
    if len(block) < header_size:
        raise _invalid(
            f"truncated NIfTI file ({ext}): the {header_size}-byte header is incomplete ({len(block)} bytes)"
        )
    try:
        header = klass.from_fileobj(io.BytesIO(block[:header_size]), check=True)
    except Exception as exc:  # nibabel raises HeaderDataError, ValueError, KeyError ... on nonsense
        raise _invalid(f"invalid NIfTI header ({ext}): {exc}") from exc
    magic = bytes(header["magic"]).rstrip(b"\x00")
    if magic not in (b"n+1", b"n+2"):
        if magic in (b"ni1", b"ni2"):
            raise _invalid(
                f"NIfTI header/image pair (.hdr/.img) is not supported as {ext}: its data lives in another "
                "file; upload a single-file NIfTI"
            )
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
    if vox_offset < header_size:
        raise _invalid(f"invalid NIfTI header ({ext}): vox_offset {vox_offset} points inside the header")
    nbytes = _check_limits(shape, dtype.itemsize, vox_offset, f"NIfTI file ({ext})", limits)
    return VolumeHeader(shape, dtype.name, spacing), vox_offset, nbytes


def _declared(header: VolumeHeader, vox_offset: int, nbytes: int) -> str:
    return f"{vox_offset}-byte header + {nbytes} bytes of {header.dtype} {header.shape}"


def _check_nifti_plain(path: Path, size: int, limits: VolumeLimits) -> VolumeHeader:
    with open(path, "rb") as stream:
        header, vox_offset, nbytes = _read_nifti_header(stream, ".nii", limits)
    if size < vox_offset + nbytes:
        raise _invalid(
            f"truncated NIfTI file (.nii): {size} bytes, but the header declares "
            f"{vox_offset + nbytes} ({_declared(header, vox_offset, nbytes)})"
        )
    return header


def _check_nifti_gz(path: Path, size: int, limits: VolumeLimits) -> VolumeHeader:
    with open(path, "rb") as raw:
        head = raw.read(132)
        if not head.startswith(_GZIP_MAGIC):
            raise _invalid(
                "not a gzip-compressed file (.nii.gz): the gzip magic bytes 1f 8b are missing" + _looks_like(head)
            )
        raw.seek(0)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                header, vox_offset, nbytes = _read_nifti_header(stream, ".nii.gz", limits)  # type: ignore[arg-type]
        except InvalidArgument:
            raise
        except (OSError, EOFError, ValueError, zlib.error) as exc:  # BadGzipFile, corrupt or truncated stream
            raise _invalid(f"corrupt gzip stream (.nii.gz): {exc}") from exc
    _check_compressed_size(
        path, size, 0, vox_offset + nbytes, "NIfTI file (.nii.gz)", _declared(header, vox_offset, nbytes)
    )
    return header


# -- NRRD ------------------------------------------------------------------------------


def _check_header_line(line: bytes, number: int, ext: str) -> None:
    """Printable ASCII, tabs, and one line end (\n or \r\n): nothing that splits or ends a line for
    one reader but not another (\x1c, \x0b, \x0c, a lone \r, NUL, non-ASCII)."""
    body = line[:-2] if line.endswith(b"\r\n") else line[:-1] if line.endswith(b"\n") else line
    for byte in body:
        if byte >= 0x7F or (byte < 0x20 and byte not in _CONTROL_OK):
            kind = "a non-ASCII byte" if byte >= 0x80 else f"the control byte 0x{byte:02x}"
            raise _invalid(
                f"invalid NRRD header ({ext}): line {number} holds {kind}; the header must be printable ASCII text"
            )


def split_nrrd_header(head: bytes, ext: str = ".nrrd") -> tuple[bytes, int]:
    """The NRRD header in `head` (the file's first bytes) and where its data starts.

    Lines are split on \n only, and the header ends at the first line that is blank once trailing
    whitespace is removed: exactly how pynrrd reads a file. Refuses control bytes (see
    `_check_header_line`) so the split cannot differ for any other reader either.
    """
    if not head.startswith(b"NRRD000"):
        raise _invalid(f"not an NRRD file ({ext}): it does not start with the magic 'NRRD000x'" + _looks_like(head))
    position = 0
    number = 0
    while True:
        end = head.find(b"\n", position)
        if end < 0:
            _check_header_line(head[position:], number + 1, ext)
            if len(head) >= _MAX_NRRD_HEADER:
                raise _invalid(f"invalid NRRD header ({ext}): no blank line ends it within the first 1 MiB")
            raise _invalid(f"truncated NRRD file ({ext}): the header is not ended by a blank line, and no data follows")
        line = head[position : end + 1]
        number += 1
        _check_header_line(line, number, ext)
        position = end + 1
        if number > 1 and not line.strip():
            return head[:position], position


def _detached_field(header: dict[str, Any]) -> str | None:
    for field in header:
        if str(field).lower().replace(" ", "").replace("_", "") == "datafile":
            return str(field)
    return None


def parse_nrrd_header(raw: bytes, ext: str = ".nrrd") -> dict[str, Any]:
    """The fields of a header from `split_nrrd_header`, parsed by pynrrd from the same lines;
    a detached data file (`data file:`, also `LIST`) is refused."""
    import nrrd  # imported lazily: only uploads need it

    try:
        header = dict(nrrd.read_header(io.BytesIO(raw)))
    except Exception as exc:  # pynrrd raises NRRDError, ValueError ... on nonsense
        raise _invalid(f"invalid NRRD header ({ext}): {exc}") from exc
    refuse_detached_nrrd(header, ext)
    return header


def refuse_detached_nrrd(header: dict[str, Any], ext: str = ".nrrd") -> None:
    """A reader must never open another file because a header says so."""
    field = _detached_field(header)
    if field is not None:
        raise _invalid(
            f"invalid NRRD header ({ext}): detached data files ({field!r}) are not supported: "
            "upload an NRRD with the data attached"
        )


def _check_nrrd(path: Path, size: int, ext: str, limits: VolumeLimits) -> VolumeHeader:
    from nrrd.reader import _determine_datatype

    raw_header, data_start = split_nrrd_header(_head(path, _MAX_NRRD_HEADER), ext)
    header = parse_nrrd_header(raw_header, ext)
    try:
        for field in ("type", "dimension", "sizes", "encoding"):
            if field not in header:
                raise ValueError(f"missing required field {field!r}")
        sizes = tuple(int(s) for s in header["sizes"])
        if int(header["dimension"]) != len(sizes):
            raise ValueError(f"dimension {header['dimension']} does not match sizes {sizes}")
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"sizes {sizes} hold no voxels")
        dtype = _determine_datatype(header)
        spacing = _nrrd_spacing(header, len(sizes))
        line_skip = int(header.get("line skip", header.get("lineskip", 0)))
        byte_skip = int(header.get("byte skip", header.get("byteskip", 0)))
    except Exception as exc:
        raise _invalid(f"invalid NRRD header ({ext}): {exc}") from exc
    if line_skip < 0 or byte_skip < -1:
        raise _invalid(f"invalid NRRD header ({ext}): line skip {line_skip} / byte skip {byte_skip} out of range")
    nbytes = _check_limits(sizes, dtype.itemsize, max(byte_skip, 0), f"NRRD file ({ext})", limits)
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
    """Is the data all there, and not much more? Exact for raw, gzip and bzip2 (both decompressed
    with a cap); bounded for text."""
    data_size = size - data_start
    declared = f"{volume.dtype} {volume.shape}"
    compressed = encoding in ("gzip", "gz", "bzip2", "bz2")
    if line_skip and compressed:
        raise _invalid(f"invalid NRRD header ({ext}): line skip with {encoding} data is not supported")
    if encoding == "raw":
        needed = nbytes + max(byte_skip, 0)
        if data_size < needed and not line_skip:
            raise _invalid(
                f"truncated NRRD file ({ext}): {data_size} bytes of raw data, but the header declares "
                f"{needed} ({declared})"
            )
        if data_size != needed and not line_skip and byte_skip != -1:
            # pynrrd reads everything after the header: a reader would fail on (or allocate) the rest.
            raise _invalid(
                f"invalid NRRD file ({ext}): {data_size} bytes of raw data, but the header declares {needed} ({declared})"
            )
        if data_size > needed + _MAX_HEADER_SKIP:
            raise _invalid(
                f"invalid NRRD file ({ext}): {data_size} bytes of raw data, far more than the {needed} declared"
            )
    elif compressed:
        kind = "gzip" if encoding in ("gzip", "gz") else "bzip2"
        magic = _GZIP_MAGIC if kind == "gzip" else b"BZh"
        with open(path, "rb") as stream:
            stream.seek(data_start)
            if stream.read(len(magic)) != magic:
                raise _invalid(f"corrupt NRRD file ({ext}): {kind} encoding declared, but the data is not {kind}")
        if byte_skip == -1:  # the data is the last nbytes of the stream
            most = nbytes + _MAX_HEADER_SKIP
            _check_compressed_size(path, size, data_start, nbytes, f"NRRD file ({ext})", declared, kind, most)
        else:
            _check_compressed_size(path, size, data_start, nbytes + byte_skip, f"NRRD file ({ext})", declared, kind)
    elif encoding not in ("ascii", "text", "txt"):
        raise _invalid(f"invalid NRRD header ({ext}): unsupported encoding {encoding!r}")
    elif data_size <= 0:
        raise _invalid(f"truncated NRRD file ({ext}): no data after the header")
    elif data_size > 64 * math.prod(volume.shape) + _READ_SIZE:
        raise _invalid(f"invalid NRRD file ({ext}): {data_size} bytes of text for {math.prod(volume.shape)} values")


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


def _check_zip_directory(path: Path, limits: VolumeLimits) -> None:
    """The member count from the end record, before zipfile builds an object per member."""
    with open(path, "rb") as stream:
        try:
            end = zipfile._EndRecData(stream)  # type: ignore[attr-defined]
        except OSError:
            end = None
    if not end:
        raise _invalid("corrupt ZIP file: no end of central directory record" + _looks_like(_head(path)))
    count = int(end[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]
    if count > limits.max_zip_members:
        raise _invalid(f"the ZIP file holds {count} members, over the limit of {limits.max_zip_members}")


def _candidate_members(archive: zipfile.ZipFile, limits: VolumeLimits) -> list[zipfile.ZipInfo]:
    """Files that may be DICOM: no folders, no macOS resource forks, no hidden files.

    Every member is checked first: a safe name, a size and a compression ratio within the limits.
    """
    members = []
    infos = archive.infolist()
    if len(infos) > limits.max_zip_members:
        raise _invalid(f"the ZIP file holds {len(infos)} members, over the limit of {limits.max_zip_members}")
    total = 0
    for member in infos:
        if _unsafe_member(member.filename):
            raise _invalid(
                f"unsafe member name {member.filename!r} in the ZIP file: absolute paths and '..' are refused"
            )
        if member.file_size > limits.max_zip_member_bytes:
            raise _invalid(
                f"ZIP member {member.filename[:100]!r} expands to {member.file_size} bytes, "
                f"over the limit of {limits.max_zip_member_bytes}"
            )
        if member.file_size > _READ_SIZE and member.file_size > limits.max_zip_ratio * max(member.compress_size, 1):
            raise _invalid(
                f"ZIP member {member.filename[:100]!r} expands {member.file_size // max(member.compress_size, 1)} times "
                f"({member.compress_size} -> {member.file_size} bytes), over the limit of {limits.max_zip_ratio}: "
                "refused as a decompression bomb"
            )
        total += member.file_size
        base = member.filename.rstrip("/").rsplit("/", 1)[-1]
        if member.is_dir() or member.filename.startswith("__MACOSX/") or base.startswith("."):
            continue
        members.append(member)
    if total > 2 * limits.max_bytes:
        raise _invalid(f"the ZIP file expands to {total} bytes, over the limit of {2 * limits.max_bytes}")
    return members


class _Budget:
    """A member stream that refuses to read more than `max_read` bytes into memory or to seek
    (decompress) past `max_position`: what bounds one DICOM header read."""

    def __init__(self, raw: Any, size: int, max_read: int, max_position: int) -> None:
        self.raw = raw
        self.size = size
        self.max_read = max_read
        self.max_position = max_position
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.max_read - self.read_bytes + 1
        if self.read_bytes + size > self.max_read + 1:
            size = self.max_read - self.read_bytes + 1
        data = self.raw.read(size)
        self.read_bytes += len(data)
        if self.read_bytes > self.max_read:
            raise ValueError(f"the DICOM header is larger than {self.max_read} bytes")
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        here = self.raw.tell()
        target = offset if whence == 0 else here + offset if whence == 1 else self.size + offset
        if target > self.max_position:
            raise ValueError(f"the DICOM header reaches past {self.max_position} bytes")
        if target <= here:
            return int(self.raw.seek(target))
        while here < target:  # forward in small steps (zipfile's own seek reads 16 MiB at once)
            step = self.raw.read(min(_FEED_SIZE * 16, target - here))
            if not step:
                break
            here += len(step)
        return here

    def tell(self) -> int:
        return int(self.raw.tell())


def _read_dicom_image(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> Any:
    """The member's DICOM header if it is an image (has Rows and Columns); raises otherwise.

    Only the few tags needed are kept (large and other elements are skipped, not read), and the
    read stops before the pixel data, within a byte budget. Files without the 128-byte preamble
    and 'DICM' are legal DICOM too: read them with force, but then insist on SOPClassUID as well,
    so random bytes never pass.
    """
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    def read(force: bool) -> Any:
        with archive.open(member) as stream:
            bounded = _Budget(stream, member.file_size, _DICOM_HEADER_READ_BUDGET, 8 * _DICOM_HEADER_READ_BUDGET)
            return dcmread(
                bounded, stop_before_pixels=True, force=force, defer_size=4096, specific_tags=list(_DICOM_TAGS)
            )

    try:
        dataset = read(force=False)
        required: tuple[str, ...] = ("Rows", "Columns")
    except InvalidDicomError:
        dataset = read(force=True)
        required = ("SOPClassUID", "Rows", "Columns")
    missing = [name for name in required if name not in dataset]
    if missing:
        raise ValueError(f"not a DICOM image (no {', '.join(missing)})")
    return dataset


def _dicom_volume(dataset: Any, files: int, limits: VolumeLimits) -> VolumeHeader:
    rows = int(dataset.get("Rows", 0) or 0)
    cols = int(dataset.get("Columns", 0) or 0)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    bits = int(dataset.get("BitsAllocated", 16) or 16)
    signed = int(dataset.get("PixelRepresentation", 0) or 0) == 1
    pixel = [float(v) for v in (dataset.get("PixelSpacing") or [1.0, 1.0])]
    thickness = float(dataset.get("SliceThickness", 1.0) or 1.0)
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise ValueError(f"image of {rows} x {cols} pixels, {frames} frames")
    shape = (rows, cols, files * frames)
    _check_limits(shape, max(bits // 8, 1), 0, "DICOM series (.zip)", limits)
    dtype = f"{'int' if signed else 'uint'}{bits}"
    return VolumeHeader(shape, dtype, (*pixel[:2], thickness))


def _check_dicom_zip(path: Path, limits: VolumeLimits) -> VolumeHeader:
    _check_zip_directory(path, limits)
    try:
        with zipfile.ZipFile(path) as archive:
            members = _candidate_members(archive, limits)
            if not members:
                raise _invalid("the ZIP file is empty: expected the files of one DICOM series")
            errors: list[str] = []
            for member in members[:_MAX_DICOM_MEMBERS_TRIED]:
                try:
                    dataset = _read_dicom_image(archive, member)
                except Exception as exc:  # noqa: BLE001 - any member failure just means "try the next"
                    errors.append(f"{member.filename}: {exc}"[:200])
                    continue
                try:
                    return _dicom_volume(dataset, len(members), limits)
                except InvalidArgument:
                    raise
                except Exception as exc:  # noqa: BLE001 - a nonsense header: try the next
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
    "DEFAULT_LIMITS",
    "IMAGE_EXTS",
    "LABEL_EXTS",
    "VolumeHeader",
    "VolumeLimits",
    "check_volume",
    "image_ext_from_name",
    "label_ext_from_name",
    "parse_nrrd_header",
    "refuse_detached_nrrd",
    "split_nrrd_header",
]
