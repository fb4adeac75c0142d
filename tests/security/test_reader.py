"""The volume check and the readers, generated: whatever the check accepts, pynrrd reads the same
header (no detached data file), and no mutation of a valid file makes the check fail any way
but with INVALID_INPUT. The reader (inference, scoring) refuses every hostile file itself."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.common.formats import check_volume
from services.common.models.volumes import VolumeFiles
from tests.security.hostile import VOLUME_CASES, build, ct_small

_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("secret") / "secret.bin"
    data = bytes(range(64))
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("case", VOLUME_CASES)
def test_the_reader_refuses_hostile_volumes(tmp_path: Path, secret: tuple[Path, bytes], case: str) -> None:
    """What inference and scoring read goes through the same check, even for a stored file."""
    name, data = build(case, str(secret[0]), "/nonexistent/x")
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InvalidArgument) as caught:
        VolumeFiles().read(path, name)
    assert str(secret[0]) not in caught.value.message and str(tmp_path) not in caught.value.message


def _nrrd_header(tmp_path: Path) -> tuple[bytes, bytes]:
    path = tmp_path / "v.nrrd"
    nrrd.write(str(path), np.zeros((4, 4, 4), np.uint8), {"encoding": "raw"})
    header, _, body = path.read_bytes().partition(b"\n\n")
    return header, body


_BYPASS_BYTES = [0x1C, 0x1D, 0x1E, 0x1F, 0x0D, 0x0B, 0x0C, 0x85, 0x00, 0x7F, 0xFF]


@pytest.mark.parametrize("byte", _BYPASS_BYTES, ids=[f"0x{b:02x}" for b in _BYPASS_BYTES])
def test_line_splitting_bypasses_are_refused(tmp_path: Path, secret: tuple[Path, bytes], byte: int) -> None:
    """Bytes str.splitlines() (or a decoder dropping non-ASCII) treats differently from pynrrd."""
    header, body = _nrrd_header(tmp_path)
    path = tmp_path / "attack.nrrd"
    path.write_bytes(header + b"\n" + bytes([byte]) + b"data file: " + str(secret[0]).encode() + b"\n\n" + body)
    with pytest.raises(InvalidArgument):
        check_volume(path, ".nrrd")
    with pytest.raises(InvalidArgument):
        VolumeFiles().read(path, "attack.nrrd")


@settings(max_examples=256, deadline=None, suppress_health_check=_HEALTH)
@given(byte=st.integers(0, 255), before=st.binary(max_size=3))
def test_no_byte_smuggles_a_data_file_past_the_check(
    tmp_path: Path, secret: tuple[Path, bytes], byte: int, before: bytes
) -> None:
    """Any bytes before `data file:`: either the check refuses, or pynrrd itself (no guard of
    ours) sees no data file field and reads no byte of the secret."""
    header, body = _nrrd_header(tmp_path)
    line = before + bytes([byte]) + b"data file: " + str(secret[0]).encode()
    path = tmp_path / "attack.nrrd"
    path.write_bytes(header + b"\n" + line + b"\n\n" + body)
    try:
        check_volume(path, ".nrrd")
    except InvalidArgument:
        with pytest.raises(InvalidArgument):
            VolumeFiles().read(path, "attack.nrrd")
        return
    _assert_pynrrd_reads_only_this_file(path, secret[1])


def _assert_pynrrd_reads_only_this_file(path: Path, secret: bytes) -> None:
    parsed = nrrd.read_header(str(path))
    assert not any(str(key).replace(" ", "").lower() == "datafile" for key in parsed), parsed
    data, _ = nrrd.read(str(path))
    assert data.tobytes() != secret
    assert VolumeFiles().read(path, path.name).shape == (4, 4, 4)


@settings(max_examples=300, deadline=None, suppress_health_check=_HEALTH)
@given(lines=st.lists(st.binary(max_size=40), max_size=4))
def test_check_and_pynrrd_see_the_same_header(tmp_path: Path, secret: tuple[Path, bytes], lines: list[bytes]) -> None:
    """Generated junk lines (with a data file field hidden among them now and then): when the
    check accepts, pynrrd's own reader (no guard of ours) finds no detached data file and never
    returns the secret's bytes."""
    header, body = _nrrd_header(tmp_path)
    extra = b"".join(line + b"\n" for line in lines)
    if lines and lines[0][:1] == b"#":  # sometimes hide the field after a comment
        extra += b"data file: " + str(secret[0]).encode() + b"\n"
    path = tmp_path / "fuzz.nrrd"
    path.write_bytes(header + b"\n" + extra + b"\n" + body)
    try:
        check_volume(path, ".nrrd")
    except InvalidArgument:
        return
    _assert_pynrrd_reads_only_this_file(path, secret[1])


def _valid_files(tmp_path: Path) -> dict[str, bytes]:
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    raw = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    path = tmp_path / "v.nrrd"
    nrrd.write(str(path), volume, {"encoding": "gzip"})
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as out:
        out.write(ct_small(), "IM1.dcm")
    return {".nii": raw, ".nii.gz": gzip.compress(raw), ".nrrd": path.read_bytes(), ".zip": archive.getvalue()}


@settings(max_examples=200, deadline=None, suppress_health_check=_HEALTH)
@given(
    ext=st.sampled_from([".nii", ".nii.gz", ".nrrd", ".zip"]),
    at=st.integers(0, 10_000),
    junk=st.binary(min_size=1, max_size=16),
)
def test_mutated_files_only_ever_fail_as_invalid_input(tmp_path: Path, ext: str, at: int, junk: bytes) -> None:
    """Overwrite a few bytes anywhere in a valid file: the check accepts or says INVALID_INPUT,
    never another exception (a 500)."""
    data = bytearray(_valid_files(tmp_path)[ext])
    at %= len(data)
    data[at : at + len(junk)] = junk
    path = tmp_path / f"m{ext}"
    path.write_bytes(bytes(data))
    try:
        check_volume(path, ext)
    except InvalidArgument as error:
        assert error.reason == "INVALID_INPUT"


@pytest.mark.parametrize("case", ["nrrd-data-file-x1c", "nrrd-gzip-bomb", "nifti-1024-cubed"])
async def test_training_never_caches_a_hostile_file(tmp_path: Path, secret: tuple[Path, bytes], case: str) -> None:
    """Training reads with MONAI's loaders (pynrrd follows a data file): its cache runs the same
    check on every download, so such a file never reaches them."""
    import hashlib

    from services.common.datastore_client import DatastoreClient
    from services.train.adapters.data import DataCache

    name, data = build(case, str(secret[0]), "/nonexistent/x")
    sha = hashlib.sha256(data).hexdigest()
    cache = DataCache(DatastoreClient("127.0.0.1:9"), tmp_path / "cache", budget_bytes=1 << 30)

    async def download(name: str, sha256: str, tmp_dir: Path, stream: object) -> Path:
        path = tmp_dir / "blob"
        path.write_bytes(data)
        return path

    cache._download = download  # type: ignore[method-assign]  # the bytes, as the datastore would send them
    ext = ".nrrd" if name.endswith(".nrrd") else ".nii.gz"
    with pytest.raises(InvalidArgument):
        await cache._fetch(f"images/{case}", sha, ext, lambda folder: None)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
