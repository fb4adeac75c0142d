"""GET /datastore/?output=all patched from the change log (adapters/index/export.py): after
random writes of every kind (uploads, label saves, info updates, scores with info, next-sample
marks, deletes, reindex batches, clear) the kept, patched JSON is byte for byte the JSON
rendered whole, on SQLite and on PostgreSQL, with and without the hidden session images;
writes that land while a patch runs are never lost, also from another replica."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from services.common.errors import NotFound
from services.datastore.adapters.index import ImageImport, LabelImport, SqlIndex
from services.datastore.adapters.index.export import Export
from tests.fixtures.polling import wait_until

SHA = "a" * 64
SHA2 = "b" * 64
HIDE = {"hidden_id_prefix": "session-", "hidden_info_key": "session"}
VARIANTS: list[dict[str, str]] = [{}, HIDE]
# Ids whose order tells byte order from other orders: case, accents, other scripts, spaces.
IDS = [
    "a", "a_", "aé", "B", "b b", "img_0001", "img_0002", "img_0010", "z", "Ä", "日本", "ß",
    "session-1", "session-2", "session-3", "x" * 40, "1", "10", "2", "-dash",
]  # fmt: skip
TAGS = ["final", "original", "zeta"]


@pytest.fixture
def index(index_url: str) -> Iterator[SqlIndex]:
    ix = SqlIndex(index_url)
    yield ix
    ix.close()


def info(rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(rng.randrange(4)):
        key = rng.choice(["k", "ts", "name", "é", "session", "label_info", "n"])
        out[key] = rng.choice([1, 2.5, "v", "ü", None, True, False, [1, {"a": "b"}], {"x": [None]}])
    return out


def random_write(ix: SqlIndex, rng: random.Random, step: int) -> str:
    """One write of a random kind; failures of writes on missing rows are part of the mix."""
    image_id = rng.choice(IDS)
    kind = rng.choices(
        ["upload", "label", "image_info", "label_info", "delete_label", "delete_image", "score", "lease", "bulk",
         "delete_many", "clear"],
        weights=[20, 15, 20, 8, 6, 6, 5, 4, 4, 3, 1],
    )[0]  # fmt: skip
    try:
        if kind == "upload":
            ix.upsert_image(image_id, rng.choice([".nii.gz", ".nrrd"]), rng.choice([SHA, SHA2]), 10, info(rng),
                            now=1_800_000_000 + step + rng.random())  # fmt: skip
        elif kind == "label":
            ix.upsert_label(image_id, rng.choice(TAGS), ".nii.gz", SHA, 3, info(rng), now=1_800_000_000 + step)
        elif kind == "image_info":
            ix.update_image_info(image_id, info(rng) | ({"session": True} if rng.random() < 0.3 else {}),
                                 replace=rng.random() < 0.3)  # fmt: skip
        elif kind == "label_info":
            ix.update_label_info(image_id, rng.choice(TAGS), info(rng), replace=rng.random() < 0.5)
        elif kind == "delete_label":
            ix.delete_label(image_id, rng.choice(TAGS))
        elif kind == "delete_image":
            ix.delete_image(image_id)
        elif kind == "score":
            ix.set_score(image_id, "entropy", rng.random(), info={"epistemic_entropy": rng.random()})
        elif kind == "lease":
            ix.acquire_next_lease(f"c{rng.randrange(3)}", "random", ttl_seconds=60, mark_in_info=True)
        elif kind == "bulk":
            ids = rng.sample(IDS, rng.randrange(1, 8))
            ix.bulk_import(
                [ImageImport(i, ".nii.gz", rng.choice([SHA, SHA2]), 10, info(rng)) for i in ids],
                [LabelImport(i, rng.choice(TAGS), ".nrrd", SHA, 3, info(rng)) for i in rng.sample(IDS, 3)],
                now=1_800_000_000 + step,
            )
        elif kind == "delete_many":
            if rng.random() < 0.5:
                ix.delete_images(rng.sample(IDS, 3))
            else:
                ix.delete_labels([(rng.choice(IDS), rng.choice(TAGS)) for _ in range(3)])
        else:
            ix.clear()
    except NotFound:  # a write on a missing image or label is part of the mix
        pass
    return kind


def assert_patched_is_rebuilt(ix: SqlIndex, what: str) -> None:
    fresh = Export(ix.db)  # keeps nothing: renders every image again
    for hide in VARIANTS:
        patched = ix.export_monailabel_json("ds", "Dataset", **hide)
        assert patched == fresh.rebuild_monailabel_json("ds", "Dataset", **hide), (what, hide)
    model = ix.export_monailabel_model("ds", "Dataset")
    assert json.loads(patched) == {**model, "objects": {k: v for k, v in model["objects"].items()
                                                         if not (k.startswith("session-")
                                                                 and v["image"]["info"].get("session") is True)}}  # fmt: skip
    assert list(json.loads(patched)["objects"]) == sorted(json.loads(patched)["objects"])


def test_random_writes_patch_to_the_rebuilt_bytes(index: SqlIndex) -> None:
    rng = random.Random(1616)
    index.bulk_import([ImageImport(i, ".nii.gz", SHA, 10, {"n": n}) for n, i in enumerate(IDS[:12])])
    assert_patched_is_rebuilt(index, "start")
    kinds: list[str] = []
    for step in range(300):
        kinds.append(random_write(index, rng, step))
        if rng.random() < 0.6:  # sometimes several writes between two reads
            assert_patched_is_rebuilt(index, f"step {step}: {kinds[-3:]}")
    assert_patched_is_rebuilt(index, "end")
    assert {"upload", "label", "image_info", "delete_image", "clear"} <= set(kinds)
    exporter = index.exporter
    # Most answers were patches; whole renders only at the start and after a clear (or a
    # batch that changed most of these few images).
    assert exporter.patches > 100
    assert exporter.full_builds < exporter.patches / 4


def test_a_write_that_changes_nothing_shown_keeps_the_answer(index: SqlIndex) -> None:
    index.bulk_import([ImageImport(i, ".nii.gz", SHA, 10, {}) for i in IDS])
    body = index.export_monailabel_json(**HIDE)
    builds, patches = index.exporter.full_builds, index.exporter.patches
    index.put_record("job", "j1", {"x": 1})  # not an image write: the log does not move
    index.set_score("a", "entropy", 0.5)  # a score without info is not in the JSON
    assert index.export_monailabel_json(**HIDE) == body
    assert (index.exporter.full_builds, index.exporter.patches) == (builds, patches)


def test_many_changes_render_everything_again(index: SqlIndex) -> None:
    index.bulk_import([ImageImport(f"i{n:03d}", ".nii.gz", SHA, 10, {}) for n in range(100)])
    index.export_monailabel_json()
    builds = index.exporter.full_builds
    index.bulk_import([ImageImport(f"i{n:03d}", ".nii.gz", SHA, 10, {"v": 2}) for n in range(0, 100, 2)])
    assert_patched_is_rebuilt(index, "half changed")
    assert index.exporter.full_builds > builds


def test_a_large_reindex_asks_for_a_rebuild(index: SqlIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    import services.datastore.adapters.index.base as base

    monkeypatch.setattr(base, "LOG_MAX_IMAGES", 5)
    index.bulk_import([ImageImport(f"i{n:03d}", ".nii.gz", SHA, 10, {}) for n in range(100)])
    index.export_monailabel_json()
    builds = index.exporter.full_builds
    index.bulk_import([ImageImport(f"i{n:03d}", ".nii.gz", SHA, 10, {"v": 2}) for n in range(6)])
    assert_patched_is_rebuilt(index, "reset")
    assert index.exporter.full_builds == builds + 2  # each variant once


def test_writes_during_patches_are_not_lost(index: SqlIndex) -> None:
    index.bulk_import([ImageImport(i, ".nii.gz", SHA, 10, {}) for i in IDS])
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for step in range(80):
                kind = random_write(index, rng, step)
                if kind == "clear":
                    index.bulk_import([ImageImport(i, ".nii.gz", SHA, 10, {}) for i in IDS[:5]])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def reader() -> None:
        try:
            while not stop.is_set():
                for hide in VARIANTS:
                    index.export_monailabel_json("ds", "Dataset", **hide)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(seed,)) for seed in range(3)]
    for th in readers + writers:
        th.start()
    for th in writers:
        th.join()
    stop.set()
    for th in readers:
        th.join()
    assert errors == []
    assert_patched_is_rebuilt(index, "after concurrent writes")
    assert index.exporter.patches > 0


def test_another_replicas_writes_are_patched_in(postgres_url: str) -> None:
    """Two replicas on one PostgreSQL: B writes while A serves; once B's writes are done, A's
    answer is the rebuilt one (whether or not A listens: the log is in the database)."""
    with SqlIndex(postgres_url) as a, SqlIndex(postgres_url) as b:
        a.listen(lambda: None)
        wait_until(lambda: a.db.exclusive, "A to listen")
        b.bulk_import([ImageImport(i, ".nii.gz", SHA, 10, {}) for i in IDS])
        stop = threading.Event()
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                while not stop.is_set():
                    a.export_monailabel_json("ds", "Dataset", **HIDE)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        th = threading.Thread(target=reader)
        th.start()
        rng = random.Random(7)
        try:
            for step in range(150):
                random_write(b, rng, step)
        finally:
            stop.set()
            th.join()
        assert errors == []
        want = Export(b.db).rebuild_monailabel_json("ds", "Dataset", **HIDE)
        wait_until(lambda: a.export_monailabel_json("ds", "Dataset", **HIDE) == want, "A to show B's writes")
        assert a.exporter.patches > 0
        assert_patched_is_rebuilt(a, "replica A")


def test_a_missing_log_row_is_put_back_and_nothing_is_lost(index: SqlIndex) -> None:
    index.bulk_import([ImageImport(i, ".nii.gz", SHA, 10, {}) for i in IDS])
    index.export_monailabel_json(**HIDE)
    with index.db.engine.begin() as conn:  # as if someone emptied the table by hand
        conn.execute(sa.delete(index.db.t.change_log))
    index.update_image_info("a", {"after": "the row went missing"})
    index.update_image_info("z", {"and": "again"})
    assert_patched_is_rebuilt(index, "row put back")
    assert b"the row went missing" in index.export_monailabel_json(**HIDE)


def test_a_change_committed_after_a_later_one_is_not_missed(postgres_url: str) -> None:
    """PostgreSQL writers log changes without waiting on each other's commits, so they commit
    out of order: a transaction that logged image "a" first and commits last must still show,
    though the reader already patched in "b", logged and committed after it."""
    with SqlIndex(postgres_url) as ix:
        ix.bulk_import([ImageImport(i, ".nii.gz", SHA, 10, {}) for i in ("a", "b")])
        ix.export_monailabel_json(**HIDE)
        images = ix.db.t.images
        with ix.db.engine.connect() as slow:
            transaction = slow.begin()
            slow.execute(sa.update(images).where(images.c.id == "a").values(info={"slow": 1}))
            Export(ix.db)._changed(slow, ["a"])  # as a write logs it, before its commit
            fast = threading.Thread(target=ix.update_image_info, args=("b", {"fast": 1}))
            fast.start()
            fast.join(30)
            assert not fast.is_alive(), "a writer waited for another writer's commit"
            seen = json.loads(ix.export_monailabel_json(**HIDE))["objects"]
            assert seen["b"]["image"]["info"]["fast"] == 1 and "slow" not in seen["a"]["image"]["info"]
            transaction.commit()
        patches = ix.exporter.patches
        seen = json.loads(ix.export_monailabel_json(**HIDE))["objects"]
        assert seen["a"]["image"]["info"]["slow"] == 1, "the change committed last was missed"
        assert ix.exporter.patches > patches  # patched in, not rendered whole
        assert_patched_is_rebuilt(ix, "out-of-order commits")
