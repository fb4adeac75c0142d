"""A write the index or the object store fails midway leaves nothing behind: no spool, no blob
the index does not name (which a reindex would adopt, bringing back a write its client was told
had failed), nothing fsck reports.

Real stores (a local studies folder, a SeaweedFS bucket; SQLite); the failure is the
StorageError an index outage raises, injected into the index's upsert right after the blob was
stored, the one moment a stopped PostgreSQL cannot be timed to hit from outside
(tests/integration/test_faults_stack.py stops the real one).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import StorageError
from services.datastore import fsck
from services.datastore.app import build_datastore
from services.datastore.domain.datastore import Datastore
from services.datastore.sample_studies import write_sample_studies
from services.datastore.settings import DatastoreSettings

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["local", "s3"])
def datastore(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Datastore]:
    values: dict[str, Any] = {"backend": request.param, "root": tmp_path / "studies", "state_dir": tmp_path / "state"}
    if request.param == "s3":
        values.update(request.getfixturevalue("seaweedfs").datastore_settings())
    store = build_datastore(DatastoreSettings(**values))
    try:
        yield store
    finally:
        store.close()


def _spooled(store: Datastore, data: bytes) -> Any:
    writer = store.new_spool(len(data))
    writer.write(data)
    return writer.finish()


def _spools(store: Datastore) -> list[str]:
    return [p.name for p in Path(store.blobs.spool_dir()).iterdir() if p.name.startswith("upload-")]


def _index_down(monkeypatch: pytest.MonkeyPatch, store: Datastore, method: str) -> None:
    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise StorageError("index upsert failed: connection refused (injected)")

    monkeypatch.setattr(store.index, method, fail)


@pytest.fixture
def volumes(tmp_path: Path) -> dict[str, bytes]:
    folder = tmp_path / "samples"
    write_sample_studies(folder, count=2, labeled=2, size=12)
    return {
        "image": (folder / "sample_00.nii.gz").read_bytes(),
        "label": (folder / "labels" / "final" / "sample_00.nii.gz").read_bytes(),
        "image2": (folder / "sample_01.nii.gz").read_bytes(),
        "label2": (folder / "labels" / "final" / "sample_01.nii.gz").read_bytes(),
    }


def _assert_nothing_left(store: Datastore) -> None:
    assert not _spools(store), "the failed upload's spool is left behind"
    report = fsck.check(store, checksums=True, min_age_seconds=0)
    assert report.clean, report.lines()


def test_index_failure_after_a_new_image_blob_removes_blob_and_spool(
    datastore: Datastore, volumes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        _index_down(patch, datastore, "upsert_image")
        with pytest.raises(StorageError):
            datastore.add_image(
                _spooled(datastore, volumes["image"]), image_id="fresh", file_name="fresh.nii.gz", info={}
            )
    assert not datastore.blobs.exists("images/fresh.nii.gz"), "a blob no index row names: a reindex would adopt it"
    _assert_nothing_left(datastore)
    # The index was never told: after a reindex the refused image is still not there.
    datastore.reindex()
    assert [image.image_id for image in datastore.list_images().items] == []


def test_index_failure_of_a_label_save_removes_blob_and_spool(
    datastore: Datastore, volumes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    datastore.add_image(_spooled(datastore, volumes["image"]), image_id="img", file_name="img.nii.gz", info={})
    with monkeypatch.context() as patch:
        _index_down(patch, datastore, "upsert_label")
        with pytest.raises(StorageError):
            datastore.add_label(
                _spooled(datastore, volumes["label"]), image_id="img", tag="final", file_name="img.nii.gz", info={}
            )
    assert not datastore.blobs.exists("labels/final/img.nii.gz")
    _assert_nothing_left(datastore)


@pytest.mark.parametrize("failing", ["get_image", "add_model_version"])
def test_index_failure_before_the_blob_removes_the_spool(
    datastore: Datastore, volumes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """The index down at the first look (a stopped PostgreSQL): the spool goes, nothing is stored."""
    calls: dict[str, Callable[[], Any]] = {
        "get_image": lambda: datastore.add_image(
            _spooled(datastore, volumes["image"]), image_id="img", file_name="img.nii.gz", info={}
        ),
        "add_model_version": lambda: datastore.add_model_version(
            _spooled(datastore, b"weights"), model="seg", version="", file_name="model.pt", metrics={}, info={}
        ),
    }
    with monkeypatch.context() as patch:
        _index_down(patch, datastore, failing)
        with pytest.raises(StorageError):
            calls[failing]()
    _assert_nothing_left(datastore)


def _downloaded(read: Any) -> tuple[str, bytes]:
    data = b"".join(read.chunks)
    assert hashlib.sha256(data).hexdigest() == read.sha256, "the bytes are not what the index row says"
    return read.sha256, data


def test_index_failure_while_replacing_an_image_keeps_the_old_bytes(
    datastore: Datastore, volumes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    old = datastore.add_image(_spooled(datastore, volumes["image"]), image_id="img", file_name="img.nii.gz", info={})
    with monkeypatch.context() as patch:
        _index_down(patch, datastore, "upsert_image")
        with pytest.raises(StorageError):
            datastore.add_image(_spooled(datastore, volumes["image2"]), image_id="img", file_name="img.nii.gz", info={})
    sha, data = _downloaded(datastore.read_image("img"))
    assert (sha, data) == (old.sha256, volumes["image"])
    assert list(datastore.blobs.list("replaced/")) == []
    _assert_nothing_left(datastore)
    # And the replacement still works once the index is back (the old bytes kept aside go).
    new = datastore.add_image(_spooled(datastore, volumes["image2"]), image_id="img", file_name="img.nii.gz", info={})
    assert _downloaded(datastore.read_image("img")) == (new.sha256, volumes["image2"])
    _assert_nothing_left(datastore)


def test_index_failure_while_replacing_a_label_keeps_the_old_bytes(
    datastore: Datastore, volumes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    datastore.add_image(_spooled(datastore, volumes["image"]), image_id="img", file_name="img.nii.gz", info={})
    old = datastore.add_label(
        _spooled(datastore, volumes["label"]), image_id="img", tag="final", file_name="img.nii.gz", info={}
    )
    with monkeypatch.context() as patch:
        _index_down(patch, datastore, "upsert_label")
        with pytest.raises(StorageError):
            datastore.add_label(
                _spooled(datastore, volumes["label2"]), image_id="img", tag="final", file_name="img.nii.gz", info={}
            )
    assert _downloaded(datastore.read_label("img", "final")) == (old.sha256, volumes["label"])
    _assert_nothing_left(datastore)


def _put_blob(store: Datastore, key: str, data: bytes) -> None:
    writer = store.new_spool(len(data))
    writer.write(data)
    spooled = writer.finish()
    store.blobs.put_file(key, Path(spooled.path), sha256=spooled.sha256)


def test_each_replacement_keeps_the_old_bytes_under_its_own_name(
    datastore: Datastore, volumes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two datastore replicas replacing one image at once must not share one kept copy (one
    would restore the other's bytes): every replacement names its own, and none is left."""
    kept: list[str] = []
    copy = datastore.blobs.copy

    def recording_copy(source: str, target: str) -> None:
        kept.append(target)
        copy(source, target)

    monkeypatch.setattr(datastore.blobs, "copy", recording_copy)
    datastore.add_image(_spooled(datastore, volumes["image"]), image_id="img", file_name="img.nii.gz", info={})
    for data in (volumes["image2"], volumes["image"]):
        datastore.add_image(_spooled(datastore, data), image_id="img", file_name="img.nii.gz", info={})
    assert len(kept) == 2 and kept[0] != kept[1], kept
    assert all(re.fullmatch(r"replaced/[0-9a-f]{32}/images/img\.nii\.gz", key) for key in kept), kept
    assert list(datastore.blobs.list("replaced/")) == []
    replaced_folder = Path(datastore.blobs.spool_dir()).parent / "replaced"
    assert not replaced_folder.exists() or not any(replaced_folder.iterdir()), "empty kept-aside folders left"
    _assert_nothing_left(datastore)


# The layout before per-write names (replaced/<key>) is what an older datastore left: still settled.
@pytest.mark.parametrize(
    "kept", ["replaced/0123456789abcdef0123456789abcdef/images/img.nii.gz", "replaced/images/img.nii.gz"]
)
def test_fsck_repair_restores_old_bytes_a_replacement_killed_before_its_row_left(
    datastore: Datastore, volumes: dict[str, bytes], kept: str
) -> None:
    """Killed after the new bytes were stored, before the row: the row (the commit) still names
    the old bytes, so --repair moves them back from replaced/."""
    old = datastore.add_image(_spooled(datastore, volumes["image"]), image_id="img", file_name="img.nii.gz", info={})
    datastore.blobs.copy("images/img.nii.gz", kept)
    _put_blob(datastore, "images/img.nii.gz", volumes["image2"])
    report = fsck.check(datastore, min_age_seconds=0)
    assert ("replaced-blob", kept) in [(p.kind, p.subject) for p in report.problems]
    after = fsck.repair(datastore, checksums=True, min_age_seconds=0)
    assert after.clean, list(after.lines())
    assert any(line.startswith("restored images/img.nii.gz") for line in after.repairs), after.repairs
    assert _downloaded(datastore.read_image("img")) == (old.sha256, volumes["image"])


def test_fsck_repair_keeps_the_committed_replacement_and_drops_the_kept_copy(
    datastore: Datastore, volumes: dict[str, bytes]
) -> None:
    """Killed after the row, before the kept copy was deleted: the new bytes are committed."""
    datastore.add_image(_spooled(datastore, volumes["image"]), image_id="img", file_name="img.nii.gz", info={})
    new = datastore.add_image(_spooled(datastore, volumes["image2"]), image_id="img", file_name="img.nii.gz", info={})
    _put_blob(datastore, "replaced/images/img.nii.gz", volumes["image"])
    after = fsck.repair(datastore, checksums=True, min_age_seconds=0)
    assert after.clean, list(after.lines())
    assert after.repairs == [
        "removed replaced/images/img.nii.gz (the index row describes the bytes under images/img.nii.gz)"
    ]
    assert _downloaded(datastore.read_image("img")) == (new.sha256, volumes["image2"])
