"""SpoolWriter limits, checksums and cleanup; iter_file_chunks ranges; sha256_file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from services.common.chunks import CHUNK_SIZE, SpooledFile, SpoolWriter, iter_file_chunks, sha256_file
from services.common.errors import InvalidArgument, ResourceExhausted


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_spool_writes_chunks_and_verifies(tmp_path: Path):
    spool_dir = tmp_path / "not" / "yet" / "there"
    writer = SpoolWriter(spool_dir, max_bytes=10 * CHUNK_SIZE)
    parts = [os.urandom(CHUNK_SIZE), os.urandom(17), b""]
    for part in parts:
        writer.write(part)
    data = b"".join(parts)
    spooled = writer.finish(sha(data))
    assert isinstance(spooled, SpooledFile)
    assert spooled.size == len(data) == writer.size
    assert spooled.sha256 == sha(data)
    assert spooled.path.parent == spool_dir
    assert spooled.path.read_bytes() == data
    writer.abort()  # after finish: a no-op, the file belongs to the caller now
    assert spooled.path.exists()


@pytest.mark.parametrize("form", [str.upper, lambda h: "SHA256:" + h, lambda h: "sha256:" + h.upper()])
def test_finish_accepts_prefixed_and_any_case(tmp_path: Path, form):
    writer = SpoolWriter(tmp_path, max_bytes=100)
    writer.write(b"abc")
    assert writer.finish(form(sha(b"abc"))).sha256 == sha(b"abc")


def test_checksum_mismatch_removes_the_file(tmp_path: Path):
    writer = SpoolWriter(tmp_path, max_bytes=100)
    writer.write(b"abc")
    with pytest.raises(InvalidArgument) as caught:
        writer.finish(sha(b"abd"))
    assert caught.value.reason == "CHECKSUM_MISMATCH"
    assert leftovers(tmp_path) == []


def test_malformed_checksum_is_refused_and_cleaned(tmp_path: Path):
    writer = SpoolWriter(tmp_path, max_bytes=100)
    writer.write(b"abc")
    with pytest.raises(InvalidArgument):
        writer.finish("md5:1234")
    assert leftovers(tmp_path) == []


def test_oversized_chunk_is_refused(tmp_path: Path):
    writer = SpoolWriter(tmp_path, max_bytes=10 * CHUNK_SIZE)
    with pytest.raises(InvalidArgument):
        writer.write(b"x" * (CHUNK_SIZE + 1))
    assert leftovers(tmp_path) == []


def test_total_beyond_limit_is_resource_exhausted(tmp_path: Path):
    writer = SpoolWriter(tmp_path, max_bytes=10)
    writer.write(b"x" * 10)  # exactly the limit is fine
    with pytest.raises(ResourceExhausted) as caught:
        writer.write(b"y")
    assert caught.value.reason == "PAYLOAD_TOO_LARGE"
    assert "10 bytes" in caught.value.message
    assert leftovers(tmp_path) == []
    with pytest.raises(InvalidArgument):
        writer.write(b"z")  # the spool is dead after a refusal


def test_abort_is_idempotent(tmp_path: Path):
    writer = SpoolWriter(tmp_path, max_bytes=100)
    writer.write(b"abc")
    assert len(leftovers(tmp_path)) == 1
    writer.abort()
    writer.abort()
    assert leftovers(tmp_path) == []


def test_context_manager_aborts_on_exception(tmp_path: Path):
    with pytest.raises(RuntimeError):
        with SpoolWriter(tmp_path, max_bytes=100) as writer:
            writer.write(b"abc")
            raise RuntimeError("client went away")
    assert leftovers(tmp_path) == []


def test_context_manager_keeps_a_finished_file(tmp_path: Path):
    with SpoolWriter(tmp_path, max_bytes=100) as writer:
        writer.write(b"abc")
        spooled = writer.finish(sha(b"abc"))
    assert spooled.path.read_bytes() == b"abc"


@pytest.fixture
def sample(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(2500)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize(
    ("offset", "limit", "chunk_size"),
    [(0, 0, 1000), (0, 0, 5000), (100, 0, 1000), (100, 1500, 1000), (2400, 1000, 64), (2500, 0, 10), (0, 1, 1000)],
)
def test_iter_file_chunks_ranges(sample, offset: int, limit: int, chunk_size: int):
    path, data = sample
    chunks = list(iter_file_chunks(path, offset=offset, limit=limit, chunk_size=chunk_size))
    expected = data[offset : offset + limit] if limit else data[offset:]
    assert b"".join(chunks) == expected
    assert all(0 < len(chunk) <= chunk_size for chunk in chunks)


def _open_fds_for(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            pass
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_iter_file_chunks_closes_the_file_when_closed_early(sample):
    path, _ = sample
    chunks = iter_file_chunks(path, chunk_size=100)
    next(chunks)
    assert _open_fds_for(path) == 1
    chunks.close()
    assert _open_fds_for(path) == 0


def test_sha256_file(sample):
    path, data = sample
    assert sha256_file(path) == sha(data)


def test_a_dropped_writer_removes_its_temp_file(tmp_path: Path):
    import gc

    writer = SpoolWriter(tmp_path, max_bytes=100)
    writer.write(b"abc")
    assert len(leftovers(tmp_path)) == 1
    del writer
    gc.collect()
    assert leftovers(tmp_path) == []
