"""One conformance suite for both blob stores: local (MONAI Label folder) and S3 (SeaweedFS)."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import InvalidArgument, NotFound, StorageError
from services.datastore.adapters.blobs import CHUNK_SIZE, BlobInfo, BlobStore, LocalBlobStore, S3BlobStore
from tests.fixtures.polling import wait_until

MIB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "studies")
    else:
        s3 = request.getfixturevalue("seaweedfs")
        yield S3BlobStore(
            s3.endpoint, s3.access_key, s3.secret_key, s3.new_bucket(), prefix="ds1/", spool_root=tmp_path / "spool"
        )


def _spool(store: BlobStore, data: bytes) -> tuple[Path, str]:
    path = store.spool_dir() / f"up-{os.urandom(6).hex()}.part"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _put(store: BlobStore, key: str, data: bytes) -> str:
    path, sha = _spool(store, data)
    store.put_file(key, path, sha256=sha)
    assert not path.exists(), "put_file must consume its source file"
    return sha


def _read(store: BlobStore, key: str, offset: int = 0, length: int | None = None) -> bytes:
    return b"".join(store.open_read(key, offset, length))


def test_implements_protocol(store: BlobStore) -> None:
    assert isinstance(store, BlobStore)
    assert store.spool_dir().is_dir()


def test_put_read_stat_replace(store: BlobStore) -> None:
    data = os.urandom(3 * MIB + 123)
    sha = _put(store, "images/img_00.nii.gz", data)
    assert store.exists("images/img_00.nii.gz")
    info = store.stat("images/img_00.nii.gz")
    assert info.key == "images/img_00.nii.gz" and info.size == len(data) and info.mtime > 0
    if isinstance(store, S3BlobStore):
        assert info.sha256 == sha
    chunks = list(store.open_read("images/img_00.nii.gz"))
    assert all(0 < len(c) <= CHUNK_SIZE for c in chunks) and len(chunks) == 4
    assert b"".join(chunks) == data

    replacement = b"second version"
    sha2 = _put(store, "images/img_00.nii.gz", replacement)
    assert _read(store, "images/img_00.nii.gz") == replacement
    assert store.stat("images/img_00.nii.gz").size == len(replacement)
    if isinstance(store, S3BlobStore):
        assert store.stat("images/img_00.nii.gz").sha256 == sha2


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, None),
        (0, 10),
        (5, None),
        (5, 0),
        (MIB - 1, 3),
        (MIB + 7, MIB + 5),
        (2 * MIB + 99, None),
        (2 * MIB + 100, None),
    ],
)
def test_ranged_reads(store: BlobStore, offset: int, length: int | None) -> None:
    data = os.urandom(2 * MIB + 100)
    _put(store, "labels/final/img_00.nii.gz", data)
    expected = data[offset:] if length is None else data[offset : offset + length]
    chunks = list(store.open_read("labels/final/img_00.nii.gz", offset, length))
    assert all(len(c) <= CHUNK_SIZE for c in chunks)
    assert b"".join(chunks) == expected


def test_missing_objects(store: BlobStore) -> None:
    with pytest.raises(NotFound) as err:
        b"".join(store.open_read("images/nope.nii.gz"))
    assert err.value.reason == "NOT_FOUND"
    with pytest.raises(NotFound):
        store.stat("labels/final/nope.nii.gz")
    assert not store.exists("models/m/1/model.pt")
    assert store.delete("images/nope.nii.gz") is False
    assert store.delete_prefix("labels/") == 0
    assert list(store.list("images/")) == []


def test_early_close_releases(store: BlobStore) -> None:
    _put(store, "images/a.nii", os.urandom(3 * MIB))
    for _ in range(40):  # more than any connection pool: leaked connections would block
        stream = store.open_read("images/a.nii")
        assert len(next(iter(stream))) == CHUNK_SIZE
        stream.close()  # type: ignore[attr-defined]
    unstarted = store.open_read("images/a.nii")
    unstarted.close()  # type: ignore[attr-defined]
    assert list(unstarted) == []
    assert _read(store, "images/a.nii", 10, 5) == _read(store, "images/a.nii")[10:15]


def test_list_sorted_recursive_and_delete(store: BlobStore) -> None:
    keys = [
        "images/b.nii.gz",
        "images/a.nrrd",
        "images/a-b.nii",
        "labels/final/a.nrrd",
        "labels/final/b.nii.gz",
        "labels/reviewer1/b.seg.nrrd",
        "models/seg/1/model.pt",
        "models/seg/2/model.ts",
        "models/seg-2/1/model.pt",
    ]
    for i, key in enumerate(keys):
        _put(store, key, f"payload {i}".encode())
    listed = list(store.list(""))
    assert [b.key for b in listed] == sorted(keys)
    assert all(isinstance(b, BlobInfo) and b.size == len(f"payload {keys.index(b.key)}") for b in listed)
    assert [b.key for b in store.list("images/")] == ["images/a-b.nii", "images/a.nrrd", "images/b.nii.gz"]
    assert [b.key for b in store.list("labels/final/")] == ["labels/final/a.nrrd", "labels/final/b.nii.gz"]
    assert [b.key for b in store.list("models/seg/")] == ["models/seg/1/model.pt", "models/seg/2/model.ts"]
    assert [b.key for b in store.list("models/")] == sorted(k for k in keys if k.startswith("models/"))
    if isinstance(store, S3BlobStore):
        # Listings carry no digest (SeaweedFS lists no user metadata, and a HEAD per object
        # would make a 100k-image listing slow); stat reads the one stored at upload.
        assert all(b.sha256 is None for b in listed)
        key = "labels/reviewer1/b.seg.nrrd"
        assert store.stat(key).sha256 == hashlib.sha256(f"payload {keys.index(key)}".encode()).hexdigest()

    assert store.delete("images/a.nrrd") is True
    assert store.delete("images/a.nrrd") is False
    assert store.delete_prefix("models/seg/") == 2
    assert [b.key for b in store.list("models/")] == ["models/seg-2/1/model.pt"]
    assert store.delete_prefix("labels/final/") == 2
    assert [b.key for b in store.list("labels/")] == ["labels/reviewer1/b.seg.nrrd"]


def test_failing_put_leaves_old_object(store: BlobStore, tmp_path: Path) -> None:
    _put(store, "images/keep.nii.gz", b"old bytes")
    with pytest.raises(StorageError):
        store.put_file("images/keep.nii.gz", store.spool_dir() / "missing.part", sha256="0" * 64)
    assert _read(store, "images/keep.nii.gz") == b"old bytes"
    with pytest.raises(StorageError):
        store.put_file("images/keep.nii.gz", tmp_path, sha256="0" * 64)  # a folder, not a file
    assert _read(store, "images/keep.nii.gz") == b"old bytes"


def test_interrupted_upload_is_never_visible(store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A big upload that dies half-way (multipart on S3) must leave the old object as it was."""
    _put(store, "images/big.nii.gz", b"old")
    data = os.urandom(40 * MIB)
    path, sha = _spool(store, data)
    if isinstance(store, S3BlobStore):
        real_upload_part = store._client._upload_part
        calls = {"n": 0}

        def flaky(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("simulated network failure")
            return real_upload_part(*args, **kwargs)

        monkeypatch.setattr(store._client, "_upload_part", flaky)
    else:
        monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("simulated rename failure")))
    with pytest.raises(StorageError):
        store.put_file("images/big.nii.gz", path, sha256=sha)
    monkeypatch.undo()
    assert not path.exists()
    assert _read(store, "images/big.nii.gz") == b"old"
    assert store.stat("images/big.nii.gz").size == 3


def test_presigned_url_downloads(store: BlobStore) -> None:
    data = os.urandom(100_000)
    _put(store, "models/seg/3/model.pt", data)
    url = store.presigned_get_url("models/seg/3/model.pt", 600)
    if url.startswith("file://"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        assert path.is_absolute() and path.read_bytes() == data
    else:
        assert url.startswith(f"http://{store.endpoint}/") and "X-Amz-Signature" in url
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.read() == data


@pytest.mark.parametrize(
    "key",
    [
        "images/../etc.nii.gz",
        "images/sub/x.nii.gz",
        "labels/../../x.nii.gz",
        "labels/final/../../../x",
        "labels/final",
        "models/../../x/y/z",
        "models/m/1",
        "../images/x.nii",
        "/images/x.nii",
        "images//x.nii",
        "other/x.nii",
        "images/a\\b.nii",
        "images/.hidden.nii.gz",
        "images/x.txt",
        "images/datastore_v2.json",
        "labels/.git/x.nii.gz",
        "labels/final/.x.nii.gz",
        "models/m/1/.model.pt",
        "images/a\nb.nii",
        "images/a\x00b.nii",
        "images/" + "a" * 250 + ".nii.gz",
        "",
    ],
)
def test_traversal_and_malformed_keys_refused(store: BlobStore, key: str) -> None:
    path, sha = _spool(store, b"x")
    with pytest.raises(InvalidArgument):
        store.put_file(key, path, sha256=sha)
    with pytest.raises(InvalidArgument):
        store.stat(key)
    with pytest.raises(InvalidArgument):
        store.open_read(key)
    with pytest.raises(InvalidArgument):
        store.delete(key)


def test_concurrent_puts_and_reads(store: BlobStore) -> None:
    errors: list[BaseException] = []
    payloads = {f"labels/t{i % 3}/img_{i:02d}.nii.gz": os.urandom(50_000 + i) for i in range(12)}

    def work(key: str, data: bytes) -> None:
        try:
            _put(store, key, data)
            assert _read(store, key) == data
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=item) for item in payloads.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [b.key for b in store.list("labels/")] == sorted(payloads)


# -- local only: MONAI Label's folder layout -------------------------------------------


def test_local_layout_is_monailabel_studies_folder(tmp_path: Path) -> None:
    root = tmp_path / "studies"
    store = LocalBlobStore(root)
    _put(store, "images/img_00.nii.gz", b"image")
    _put(store, "labels/final/img_00.nii.gz", b"label")
    _put(store, "labels/reviewer1/img_00.nrrd", b"label2")
    _put(store, "models/seg/1/model.pt", b"model")
    assert (root / "img_00.nii.gz").read_bytes() == b"image"
    assert (root / "labels" / "final" / "img_00.nii.gz").read_bytes() == b"label"
    assert (root / "labels" / "reviewer1" / "img_00.nrrd").read_bytes() == b"label2"
    assert (root / "labels" / "original").is_dir()
    assert (root / ".labelgrid" / "models" / "seg" / "1" / "model.pt").read_bytes() == b"model"
    assert store.spool_dir() == root / ".labelgrid" / "tmp"
    assert store.presigned_get_url("images/img_00.nii.gz", 60) == (root / "img_00.nii.gz").resolve().as_uri()
    # Deleting a model version prunes its empty folders; label folders stay for MONAI Label.
    assert store.delete_prefix("models/seg/") == 1
    assert not (root / ".labelgrid" / "models" / "seg").exists()
    store.delete("labels/final/img_00.nii.gz")
    assert (root / "labels" / "final").is_dir()


def test_local_adopts_existing_folder(tmp_path: Path) -> None:
    root = tmp_path / "studies"
    (root / "labels" / "final").mkdir(parents=True)
    for name in ["img_01.nii.gz", "img_02.nrrd", "slide.svs", "photo.jpg", "series.zip", "notes.txt", ".hidden.nii"]:
        (root / name).write_bytes(b"data")
    (root / "datastore_v2.json").write_text("{}")
    (root / ".lock").write_text("")
    (root / "subdir.nii.gz").mkdir()  # a folder with an image-like name
    (root / "labels" / "final" / "img_01.nii.gz").write_bytes(b"lbl")
    (root / "labels" / "final" / ".partial").write_bytes(b"x")
    (root / "labels" / "final" / "back\\slash.nii.gz").write_bytes(b"x")  # no key could address it
    (root / "labels" / "final" / "nested").mkdir()
    (root / "labels" / "final" / "nested" / "deep.nii.gz").write_bytes(b"x")
    (root / ".labelgrid" / "tmp").mkdir(parents=True)
    stale = root / ".labelgrid" / "tmp" / "upload-stale.part"
    stale.write_bytes(b"stale")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    # No other process holds the folder's lock, so a fresh spool file is a leftover too (a live
    # process's spools stay: tests/security/test_spool_lock.py).
    fresh = root / ".labelgrid" / "tmp" / "upload-fresh.part"
    fresh.write_bytes(b"fresh")

    store = LocalBlobStore(root)
    assert not stale.exists() and not fresh.exists()
    assert [b.key for b in store.list("images/")] == [
        "images/img_01.nii.gz",
        "images/img_02.nrrd",
        "images/photo.jpg",
        "images/series.zip",
        "images/slide.svs",
    ]
    assert [b.key for b in store.list("labels/")] == ["labels/final/img_01.nii.gz"]
    assert (root / "datastore_v2.json").read_text() == "{}"
    for reserved in ["images/datastore_v2.json", "images/.lock", "images/labels", "images/.labelgrid"]:
        with pytest.raises(InvalidArgument):
            store.stat(reserved)


def test_local_symlinked_folder_outside_root_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.nii.gz").write_bytes(b"secret")
    root = tmp_path / "studies"
    store = LocalBlobStore(root)
    (root / "labels" / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidArgument):
        b"".join(store.open_read("labels/evil/secret.nii.gz"))
    path, sha = _spool(store, b"x")
    with pytest.raises(InvalidArgument):
        store.put_file("labels/evil/new.nii.gz", path, sha256=sha)
    assert not (outside / "new.nii.gz").exists()


def test_local_put_from_another_folder(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "studies")
    source = tmp_path / "elsewhere.bin"
    source.write_bytes(b"moved in")
    store.put_file("images/x.nii", source, sha256=hashlib.sha256(b"moved in").hexdigest())
    assert not source.exists()
    assert _read(store, "images/x.nii") == b"moved in"


# -- S3 only ---------------------------------------------------------------------------


def test_s3_bucket_creation_and_prefix_isolation(seaweedfs: Any, tmp_path: Path) -> None:
    bucket = seaweedfs.new_bucket()
    with pytest.raises(StorageError, match="does not exist"):
        S3BlobStore(seaweedfs.endpoint, seaweedfs.access_key, seaweedfs.secret_key, bucket, create_bucket=False)
    a = S3BlobStore(seaweedfs.endpoint, seaweedfs.access_key, seaweedfs.secret_key, bucket, prefix="a")
    b = S3BlobStore(seaweedfs.endpoint, seaweedfs.access_key, seaweedfs.secret_key, bucket, prefix="b/")
    _put(a, "images/x.nii", b"in a")
    assert [i.key for i in a.list("")] == ["images/x.nii"]
    assert list(b.list("")) == []
    assert not b.exists("images/x.nii")
    assert S3BlobStore(seaweedfs.endpoint, seaweedfs.access_key, seaweedfs.secret_key, bucket, prefix="a").exists(
        "images/x.nii"
    )


def test_s3_bad_credentials_and_unreachable_are_storage_errors(seaweedfs: Any) -> None:
    with pytest.raises(StorageError, match="S3"):
        S3BlobStore(seaweedfs.endpoint, "wrong", "wrong", seaweedfs.new_bucket())
    with pytest.raises(StorageError, match="S3"):
        S3BlobStore("127.0.0.1:9", "minioadmin", "minioadmin", seaweedfs.new_bucket())


def test_bad_arguments_refused(store: BlobStore) -> None:
    _put(store, "images/a.nii", b"x")
    path, _ = _spool(store, b"y")
    with pytest.raises(InvalidArgument, match="sha256"):
        store.put_file("images/a.nii", path, sha256="not-a-digest")
    assert not path.exists(), "even a refused put_file consumes its source"
    assert _read(store, "images/a.nii") == b"x"
    with pytest.raises(InvalidArgument):
        store.delete_prefix("")
    for expires in (0, -1, 7 * 24 * 3600 + 1):
        with pytest.raises(InvalidArgument, match="expires_seconds"):
            store.presigned_get_url("images/a.nii", expires)
    with pytest.raises(InvalidArgument):
        store.open_read("images/a.nii", -1)
    with pytest.raises(InvalidArgument):
        store.open_read("images/a.nii", 0, -5)
    assert store.exists("images/a.nii")


def test_upper_case_digest_is_stored_lower(store: BlobStore) -> None:
    path, sha = _spool(store, b"digest")
    store.put_file("models/m/1/w.pt", path, sha256=sha.upper())
    if isinstance(store, S3BlobStore):
        assert store.stat("models/m/1/w.pt").sha256 == sha


def test_sort_order_is_by_whole_key(store: BlobStore) -> None:
    """'labels/a.b/' sorts before 'labels/a/' ('.' < '/'); SeaweedFS lists folder by folder."""
    keys = ["labels/a/x.nii.gz", "labels/a.b/x.nii.gz", "labels/a-b/x.nii.gz", "labels/a0/x.nii.gz"]
    for key in keys:
        _put(store, key, b"1")
    assert [b.key for b in store.list("labels/")] == sorted(keys)
    assert [b.key for b in store.list("labels/a")] == sorted(keys)
    assert [b.key for b in store.list("labels/a/")] == ["labels/a/x.nii.gz"]


def test_zero_byte_object(store: BlobStore) -> None:
    _put(store, "labels/final/empty.nii", b"")
    assert store.stat("labels/final/empty.nii").size == 0
    assert list(store.open_read("labels/final/empty.nii")) == []
    assert list(store.open_read("labels/final/empty.nii", 0, 0)) == []
    assert list(store.open_read("labels/final/empty.nii", 5)) == []


def test_local_files_get_normal_permissions(tmp_path: Path) -> None:
    """Spools are mkstemp files (0600); stored files must be readable as MONAI Label's own are."""
    store = LocalBlobStore(tmp_path / "studies")
    path = store.spool_dir() / "x.part"
    path.write_bytes(b"x")
    os.chmod(path, 0o600)
    store.put_file("images/x.nii", path, sha256=hashlib.sha256(b"x").hexdigest())
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "studies" / "x.nii").stat().st_mode) == 0o666 & ~umask


def test_local_put_across_filesystems(tmp_path: Path) -> None:
    """A source on another filesystem is copied in, then renamed: still never half visible."""
    shm = Path("/dev/shm")
    store = LocalBlobStore(tmp_path / "studies")
    if not shm.is_dir() or shm.stat().st_dev == store.spool_dir().stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem")
    source = shm / f"labelgrid-test-{os.getpid()}-{os.urandom(4).hex()}"
    data = os.urandom(3 * MIB)
    source.write_bytes(data)
    try:
        store.put_file("images/far.nii.gz", source, sha256=hashlib.sha256(data).hexdigest())
    finally:
        source.unlink(missing_ok=True)
    assert _read(store, "images/far.nii.gz") == data
    assert list(store.spool_dir().iterdir()) == []


def test_s3_endpoint_with_scheme_and_close(seaweedfs: Any) -> None:
    bucket = seaweedfs.new_bucket()
    store = S3BlobStore(f"http://{seaweedfs.endpoint}", seaweedfs.access_key, seaweedfs.secret_key, bucket)
    _put(store, "images/x.nii", b"via url")
    assert _read(store, "images/x.nii") == b"via url"
    store.close()


def test_s3_objects_from_elsewhere(seaweedfs: Any) -> None:
    """Objects put into the bucket by other tools: no digest, names we never use are not listed."""
    bucket = seaweedfs.new_bucket()
    store = S3BlobStore(seaweedfs.endpoint, seaweedfs.access_key, seaweedfs.secret_key, bucket, prefix="p")
    client = seaweedfs.client()
    for name in ["p/images/by-hand.nii.gz", "p/images/notes.txt", "p/images/sub/x.nii", "p/labels/final/.DS_Store"]:
        client.put_object(bucket, name, io.BytesIO(b"abc"), 3)
    assert [b.key for b in store.list("")] == ["images/by-hand.nii.gz"]
    assert store.stat("images/by-hand.nii.gz").sha256 is None
    assert _read(store, "images/by-hand.nii.gz", 1) == b"bc"
    # delete_prefix removes everything under the prefix, listed or not.
    assert store.delete_prefix("images/") == 3
    assert [o.object_name for o in client.list_objects(bucket, recursive=True)] == ["p/labels/final/.DS_Store"]


def test_s3_reads_ahead_and_a_dropped_stream_stops_reading(seaweedfs: Any) -> None:
    """A big read is fetched by a read-ahead thread; a stream dropped unclosed, or closed early,
    stops it and gives its connection back (more streams than the pool holds, then a full read)."""
    import gc

    store = S3BlobStore(seaweedfs.endpoint, seaweedfs.access_key, seaweedfs.secret_key, seaweedfs.new_bucket())
    data = os.urandom(12 * MIB + 5)
    _put(store, "images/big.nii", data)
    for n in range(30):
        stream = iter(store.open_read("images/big.nii"))
        assert len(next(stream)) == CHUNK_SIZE
        if n % 2:
            stream.close()  # type: ignore[attr-defined]
        del stream
    gc.collect()
    wait_until(
        lambda: not any(t.name == "s3-read-ahead" for t in threading.enumerate()),
        "the read-ahead threads to end",
        timeout=30,
        interval=0.05,
    )
    assert _read(store, "images/big.nii") == data
    assert _read(store, "images/big.nii", 3 * MIB, 2 * MIB + 1) == data[3 * MIB : 5 * MIB + 1]
    store.close()


def test_s3_read_ahead_hands_out_batches(seaweedfs: Any) -> None:
    """send_chunks takes what the read-ahead thread has read in one hop (take_chunks): the
    batches hold every byte in order, end with [], and a plain iterator is batched the same way."""
    from services.common.streams import take_chunks

    store = S3BlobStore(seaweedfs.endpoint, seaweedfs.access_key, seaweedfs.secret_key, seaweedfs.new_bucket())
    data = os.urandom(20 * MIB + 7)
    _put(store, "images/batched.nii", data)
    stream = store.open_read("images/batched.nii")
    assert hasattr(stream, "take")
    got: list[bytes] = []
    while batch := take_chunks(stream, 4 * MIB):
        assert 0 < sum(map(len, batch)) <= 4 * MIB + CHUNK_SIZE
        got.extend(batch)
    assert b"".join(got) == data
    assert take_chunks(stream, 4 * MIB) == []
    plain = iter([b"a" * MIB, b"b" * MIB, b"c"])
    assert take_chunks(plain, 2 * MIB) == [b"a" * MIB, b"b" * MIB]
    assert take_chunks(plain, 2 * MIB) == [b"c"]
    assert take_chunks(plain, 2 * MIB) == []
    store.close()


def test_s3_read_ahead_failure_comes_after_the_chunks_read_before_it() -> None:
    """A read failing mid-object: the chunks read before it are handed out first, then the
    StorageError, once; nothing after it."""
    from services.common.streams import take_chunks
    from services.datastore.adapters.blobs.s3 import _ReadAhead
    from services.datastore.adapters.blobs.shared import _ChunkStream

    source = io.BytesIO(os.urandom(3 * MIB))
    released = threading.Event()

    def read(amount: int) -> bytes:
        if source.tell() >= 3 * MIB:
            raise OSError("connection reset")
        return source.read(amount)

    ahead = _ReadAhead(_ChunkStream(read, released.set, None))
    wait_until(released.is_set, "the read-ahead thread to meet the failure", timeout=30, interval=0.01)
    assert [len(chunk) for chunk in take_chunks(ahead, 8 * MIB)] == [MIB] * 3
    with pytest.raises(StorageError, match="connection reset"):
        take_chunks(ahead, 8 * MIB)
    assert take_chunks(ahead, 8 * MIB) == []
