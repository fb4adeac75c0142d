"""S3 uploads sent while they arrive (domain.streaming.StreamingSpool + S3BlobStore.streamed_put),
on a real SeaweedFS: the object appears only when put_file completes it, with its sha256 as
metadata; every failure on the way (hang-up, checksum, a part that fails, a refused file)
aborts the multipart upload and leaves the old object as it was."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import InvalidArgument, NotFound, StorageError
from services.datastore.adapters.blobs import S3BlobStore
from services.datastore.domain.streaming import StreamingSpool, streaming_store
from tests.fixtures.polling import wait_until

MIB = 1024 * 1024
PART = 5 * MIB  # S3's smallest part: several parts from a small upload


@pytest.fixture
def store(seaweedfs: Any, tmp_path: Path) -> Iterator[S3BlobStore]:
    s3 = S3BlobStore(
        seaweedfs.endpoint,
        seaweedfs.access_key,
        seaweedfs.secret_key,
        seaweedfs.new_bucket(),
        prefix="ds/",
        spool_root=tmp_path / "spool",
        part_size=PART,
    )
    yield s3
    s3.close()


def _spool(store: S3BlobStore, key: str) -> StreamingSpool:
    found = streaming_store(store)
    assert found is not None
    return StreamingSpool(found, key, store.spool_dir(), max_bytes=1 << 34, expected_size=0)


def _write(spool: StreamingSpool, data: bytes) -> None:
    for start in range(0, len(data), MIB):
        spool.write(data[start : start + MIB])


def _uploads(store: S3BlobStore) -> list[Any]:
    """Multipart uploads still open in the store's bucket."""
    result = store._client._list_multipart_uploads(store.bucket)
    return list(result.uploads)


def _read(store: S3BlobStore, key: str) -> bytes:
    return b"".join(store.open_read(key))


def _put_old(store: S3BlobStore, key: str) -> None:
    path = store.spool_dir() / "old.part"
    path.write_bytes(b"old")
    store.put_file(key, path, sha256=hashlib.sha256(b"old").hexdigest())


@pytest.mark.parametrize("size", [3 * PART + 12345, 2 * PART, PART - 1])
def test_a_streamed_upload_is_stored_whole_with_its_sha256(store: S3BlobStore, size: int) -> None:
    data = os.urandom(size)
    spool = _spool(store, "images/big.nii")
    _write(spool, data)
    if size >= PART:
        assert _uploads(store), "full parts are sent while the upload still arrives"
    with pytest.raises(NotFound):
        store.stat("images/big.nii")  # nothing visible before put_file
    spooled = spool.finish(hashlib.sha256(data).hexdigest())
    store.put_file("images/big.nii", spooled.path, sha256=spooled.sha256)
    assert not spooled.path.exists()
    assert _read(store, "images/big.nii") == data
    info = store.stat("images/big.nii")
    assert (info.size, info.sha256) == (size, hashlib.sha256(data).hexdigest())
    assert _uploads(store) == []


def test_a_hang_up_aborts_and_keeps_the_old_object(store: S3BlobStore) -> None:
    _put_old(store, "images/big.nii")
    spool = _spool(store, "images/big.nii")
    _write(spool, os.urandom(2 * PART + 10))
    spool.abort()  # what receive_upload does when the client goes away
    assert not spool.path.exists()
    wait_until(lambda: _uploads(store) == [], "the multipart upload to be aborted")
    assert _read(store, "images/big.nii") == b"old"


def test_a_checksum_mismatch_aborts(store: S3BlobStore) -> None:
    _put_old(store, "images/big.nii")
    spool = _spool(store, "images/big.nii")
    _write(spool, os.urandom(2 * PART))
    with pytest.raises(InvalidArgument, match="sha256 mismatch"):
        spool.finish("0" * 64)
    wait_until(lambda: _uploads(store) == [], "the multipart upload to be aborted")
    assert _read(store, "images/big.nii") == b"old"


def test_a_file_refused_after_finish_is_released(store: S3BlobStore) -> None:
    """The format check refuses the spool: the datastore drops it and releases the upload."""
    _put_old(store, "images/big.nii")
    spool = _spool(store, "images/big.nii")
    data = os.urandom(2 * PART + 1)
    _write(spool, data)
    spooled = spool.finish(hashlib.sha256(data).hexdigest())
    spooled.path.unlink()
    store.release_streamed(spooled.path)
    wait_until(lambda: _uploads(store) == [], "the multipart upload to be aborted")
    assert _read(store, "images/big.nii") == b"old"


def test_a_failing_part_fails_the_upload(store: S3BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _put_old(store, "images/big.nii")
    real = store._client._upload_part
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("simulated network failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(store._client, "_upload_part", flaky)
    spool = _spool(store, "images/big.nii")
    data = os.urandom(4 * PART)
    with pytest.raises(StorageError, match="simulated network failure"):
        _write(spool, data)
        spooled = spool.finish(hashlib.sha256(data).hexdigest())
        store.put_file("images/big.nii", spooled.path, sha256=spooled.sha256)
    monkeypatch.undo()
    assert not spool.path.exists()
    wait_until(lambda: _uploads(store) == [], "the multipart upload to be aborted")
    assert _read(store, "images/big.nii") == b"old"


def test_put_file_under_another_key_aborts_the_streamed_upload(store: S3BlobStore) -> None:
    spool = _spool(store, "images/a.nii")
    data = os.urandom(2 * PART)
    _write(spool, data)
    spooled = spool.finish(hashlib.sha256(data).hexdigest())
    store.put_file("images/b.nii", spooled.path, sha256=spooled.sha256)
    assert _read(store, "images/b.nii") == data
    wait_until(lambda: _uploads(store) == [], "the multipart upload to be aborted")
    with pytest.raises(NotFound):
        store.stat("images/a.nii")
