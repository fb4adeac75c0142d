"""SqlIndex on both backends (SQLite file, real PostgreSQL): CRUD, paging, concurrency."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StorageError,
)
from services.datastore.adapters.index import ImageImport, LabelImport, SqlIndex
from services.datastore.domain.model import ImageFilter, ImageOrder, ImageRecord, Page

SHA_A = "a" * 64
SHA_B = "b" * 64
T0 = 1_800_000_000.0  # a fixed "now" for lease tests
_R = TypeVar("_R")


@pytest.fixture
def index(index_url: str) -> Iterator[SqlIndex]:
    ix = SqlIndex(index_url)
    yield ix
    ix.close()


def add_images(ix: SqlIndex, n: int, prefix: str = "img_") -> list[str]:
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    ix.bulk_import([ImageImport(i, ".nii.gz", SHA_A, 10, {"name": f"{i}.nii.gz"}) for i in ids])
    return ids


def all_pages(fetch: Callable[[str], Page[_R]]) -> list[_R]:
    items: list[_R] = []
    token = ""
    for _ in range(10_000):
        page = fetch(token)
        items.extend(page.items)
        token = page.next_page_token
        if not token:
            return items
    raise AssertionError("paging did not end")


def run_threads(n: int, fn: Callable[[int], _R]) -> list[_R]:
    """Runs fn(0..n-1) on n threads released together by a barrier."""
    barrier = threading.Barrier(n)

    def go(i: int) -> _R:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(go, range(n)))


# ---------------------------------------------------------------- images and labels


def test_image_crud_and_reupload(index: SqlIndex) -> None:
    rec = index.upsert_image("img_1", ".nii.gz", SHA_A, 100, {"ts": 1, "name": "img_1.nii.gz", "client_id": "c"})
    assert (rec.image_id, rec.ext, rec.size, rec.revision) == ("img_1", ".nii.gz", 100, 1)
    assert rec.labels == {} and rec.scores == {}
    assert rec.file_name == "img_1.nii.gz" and rec.create_time.tzinfo is not None
    index.upsert_label("img_1", "final", ".nrrd", SHA_B, 5, {"label_info": [{"name": "spleen", "idx": 1}]})
    index.set_score("img_1", "epistemic_entropy", 0.7, "v000001")

    got = index.get_image("img_1")
    assert got.labels["final"].ext == ".nrrd" and got.labels["final"].file_name == "img_1.nrrd"
    assert got.scores == {"epistemic_entropy": 0.7}

    # Re-upload: info replaced, labels kept, create time kept, scores dropped (new bytes).
    again = index.upsert_image("img_1", ".nii", SHA_B, 200, {"user": "u"})
    assert again.info == {"user": "u"} and again.ext == ".nii" and again.size == 200
    assert again.revision == 2 and again.create_time == rec.create_time
    assert set(again.labels) == {"final"} and again.scores == {}
    with pytest.raises(AlreadyExists):
        index.upsert_image("img_1", ".nii", SHA_B, 200, {}, fail_if_exists=True)

    deleted = index.delete_image("img_1")
    assert deleted.image_id == "img_1" and "final" in deleted.labels
    with pytest.raises(NotFound) as err:
        index.get_image("img_1")
    assert err.value.reason == "IMAGE_NOT_FOUND" and "img_1" in err.value.message
    with pytest.raises(NotFound):
        index.delete_image("img_1")
    # Cascade: the label went with the image, and the id can be reused cleanly.
    assert index.status().label_tags == {}
    assert index.upsert_image("img_1", ".nii", SHA_A, 1, {}).labels == {}


def test_update_image_info_merge_replace_and_cas(index: SqlIndex) -> None:
    index.upsert_image("a", ".nii", SHA_A, 1, {"ts": 1, "name": "a.nii"})
    rec = index.update_image_info("a", {"foo": "bar", "ts": 2})
    assert rec.info == {"ts": 2, "name": "a.nii", "foo": "bar"} and rec.revision == 2
    with pytest.raises(Aborted) as err:
        index.update_image_info("a", {"x": 1}, expected_revision=1)
    assert err.value.reason == "REVISION_MISMATCH"
    rec = index.update_image_info("a", {"only": True}, replace=True, expected_revision=2)
    assert rec.info == {"only": True} and rec.revision == 3
    with pytest.raises(NotFound):
        index.update_image_info("nope", {"x": 1})
    with pytest.raises(InvalidArgument):
        index.update_image_info("a", {"bad": float("nan")})
    with pytest.raises(InvalidArgument):
        index.update_image_info("a", {"bad": object()})


def test_label_crud(index: SqlIndex) -> None:
    with pytest.raises(NotFound) as err:
        index.upsert_label("ghost", "final", ".nii", SHA_A, 1, {})
    assert err.value.reason == "IMAGE_NOT_FOUND"
    index.upsert_image("a", ".nii", SHA_A, 1, {})
    lab = index.upsert_label("a", "final", ".nii.gz", SHA_A, 3, {"ts": 5, "name": "a.nii.gz"})
    assert (lab.tag, lab.revision, lab.size) == ("final", 1, 3)
    lab = index.upsert_label("a", "final", ".nii.gz", SHA_B, 4, {"client_id": "c"})
    assert lab.revision == 2 and lab.info == {"client_id": "c"} and lab.sha256 == SHA_B
    lab = index.update_label_info("a", "final", {"user": "u"})
    assert lab.info == {"client_id": "c", "user": "u"} and lab.revision == 3
    with pytest.raises(Aborted):
        index.update_label_info("a", "final", {"x": 1}, expected_revision=2)
    assert index.get_label("a", "final").info == {"client_id": "c", "user": "u"}
    with pytest.raises(NotFound) as err:
        index.get_label("a", "original")
    assert err.value.reason == "LABEL_NOT_FOUND" and "original" in err.value.message
    assert index.delete_label("a", "final").tag == "final"
    with pytest.raises(NotFound):
        index.delete_label("a", "final")
    assert index.get_image("a").labels == {}


def test_find_label_tells_an_unknown_image_from_a_missing_label(index: SqlIndex) -> None:
    with pytest.raises(NotFound) as err:
        index.find_label("ghost", "final")
    assert err.value.reason == "IMAGE_NOT_FOUND" and "ghost" in err.value.message
    index.upsert_image("a", ".nii", SHA_A, 1, {})
    index.upsert_image("b", ".nii", SHA_A, 1, {})
    assert index.find_label("a", "final") is None
    index.upsert_label("a", "original", ".nii", SHA_A, 2, {})
    index.upsert_label("b", "final", ".nii", SHA_B, 5, {})
    assert index.find_label("a", "final") is None  # another tag, another image's label: not this one
    saved = index.upsert_label("a", "final", ".nii.gz", SHA_B, 3, {"user": "u"})
    assert index.find_label("a", "final") == saved == index.get_label("a", "final")


def test_status_counts(index: SqlIndex) -> None:
    assert (index.status().total, index.status().completed, index.status().label_tags) == (0, 0, {})
    add_images(index, 6)
    for i in (0, 1):
        index.upsert_label(f"img_{i:03d}", "final", ".nii", SHA_A, 1, {})
    for i in (1, 2, 3):
        index.upsert_label(f"img_{i:03d}", "original", ".nii", SHA_A, 1, {})
    st = index.status()
    assert (st.total, st.completed, st.label_tags) == (6, 2, {"final": 2, "original": 3})


def test_concurrent_create_of_the_same_image(index: SqlIndex) -> None:
    recs = run_threads(10, lambda i: index.upsert_image("same", ".nii", SHA_A, i, {"i": i}))
    assert sorted(r.revision for r in recs) == list(range(1, 11))
    assert index.get_image("same").revision == 10


def test_label_saves_racing_bulk_label_writes_never_fail(index: SqlIndex) -> None:
    """reindex's bulk writers (delete_labels, bulk_import) take no image lock: a label save
    racing them must still land (not miss a row deleted under it, nor collide with one
    inserted), answering the row it wrote."""
    index.upsert_image("img", ".nii", SHA_A, 1)
    stop = threading.Event()
    bulk_errors: list[Exception] = []

    def bulk() -> None:
        while not stop.is_set():
            try:
                index.delete_labels([("img", "final")])
                index.bulk_import([], [LabelImport("img", "final", ".nrrd", SHA_B, 2, {})])
            except Exception as err:  # noqa: BLE001 - asserted below
                bulk_errors.append(err)

    racer = threading.Thread(target=bulk)
    racer.start()
    try:
        saved = run_threads(4, lambda i: [index.upsert_label("img", "final", ".nii", SHA_A, i) for _ in range(40)])
    finally:
        stop.set()
        racer.join()
    assert all(label.tag == "final" and label.image_id == "img" for labels in saved for label in labels)
    assert bulk_errors == []


# ---------------------------------------------------------------- listing


def test_paging_by_id_is_complete_and_stable(index: SqlIndex) -> None:
    ids = add_images(index, 57)
    first = index.list_images(page_size=10)
    assert first.total_size == 57 and len(first.items) == 10 and first.next_page_token
    # The same token gives the same page.
    p2a = index.list_images(page_size=10, page_token=first.next_page_token)
    p2b = index.list_images(page_size=10, page_token=first.next_page_token)
    assert [i.image_id for i in p2a.items] == [i.image_id for i in p2b.items]
    got = [r.image_id for r in all_pages(lambda tok: index.list_images(page_size=10, page_token=tok))]
    assert got == ids

    # Changes between pages: nothing existing is duplicated or missed.
    seen: list[str] = []
    page = index.list_images(page_size=7)
    seen += [r.image_id for r in page.items]
    index.upsert_image("img_000a", ".nii", SHA_A, 1, {})  # sorts into the page already read
    index.upsert_image("img_999", ".nii", SHA_A, 1, {})  # sorts into the future
    while page.next_page_token:
        page = index.list_images(page_size=7, page_token=page.next_page_token)
        seen += [r.image_id for r in page.items]
    assert len(seen) == len(set(seen)) and set(ids) | {"img_999"} == set(seen)
    assert index.list_images(page_size=0).items[0].image_id == "img_000"  # 0 = default size


def test_ids_sort_in_plain_string_order(index: SqlIndex) -> None:
    ids = ["B", "a", "_x", "A-1", "a.b", "Z9", "0"]
    for i in ids:
        index.upsert_image(i, ".nii", SHA_A, 1, {})
    assert [r.image_id for r in index.list_images().items] == sorted(ids)


def test_bad_page_tokens(index: SqlIndex) -> None:
    add_images(index, 5)
    tok = index.list_images(page_size=2).next_page_token
    for bad in ("garbage!", "eyJ4IjoxfQ", tok[:-3]):
        with pytest.raises(InvalidArgument):
            index.list_images(page_size=2, page_token=bad)
    with pytest.raises(InvalidArgument):  # same listing, other parameters
        index.list_images(page_size=2, page_token=tok, filter=ImageFilter.UNLABELED)
    with pytest.raises(InvalidArgument):  # a token of another listing
        index.list_records("jobs", page_token=tok)
    with pytest.raises(InvalidArgument):
        index.list_images(page_size=-1)


def test_filters_by_tag(index: SqlIndex) -> None:
    ids = add_images(index, 10)
    for i in (1, 4, 7):
        index.upsert_label(ids[i], "final", ".nii", SHA_A, 1, {})
    index.upsert_label(ids[2], "original", ".nii", SHA_A, 1, {})
    labeled = index.list_images(filter=ImageFilter.LABELED)
    assert [r.image_id for r in labeled.items] == [ids[1], ids[4], ids[7]] and labeled.total_size == 3
    unlabeled = index.list_images(filter=ImageFilter.UNLABELED, page_size=4)
    assert unlabeled.total_size == 7
    got = all_pages(lambda t: index.list_images(filter=ImageFilter.UNLABELED, page_size=4, page_token=t))
    assert [r.image_id for r in got] == [i for n, i in enumerate(ids) if n not in (1, 4, 7)]
    orig = index.list_images(filter=ImageFilter.LABELED, tag="original")
    assert [r.image_id for r in orig.items] == [ids[2]] and "original" in orig.items[0].labels


def test_a_final_label_found_by_reindex_ends_the_lease(index: SqlIndex) -> None:
    ids = add_images(index, 2)
    index.acquire_next_lease("c1", "first", ttl_seconds=600)
    index.acquire_next_lease("c2", "first", ttl_seconds=600)
    assert {lease.image_id for lease in all_pages(lambda t: index.list_leases(page_token=t))} == set(ids)
    index.bulk_import(
        [], [LabelImport(ids[0], "final", ".nii", SHA_A, 1, {}), LabelImport(ids[1], "draft", ".nii", SHA_A, 1, {})]
    )
    assert [lease.image_id for lease in all_pages(lambda t: index.list_leases(page_token=t))] == [ids[1]]


def test_final_flag_follows_every_label_write(index: SqlIndex) -> None:
    """The unlabeled/labeled views of "final" stay exact whichever path changed the labels."""

    def unlabeled() -> list[str]:
        got = all_pages(lambda t: index.list_images(filter=ImageFilter.UNLABELED, page_size=3, page_token=t))
        assert index.list_images(filter=ImageFilter.UNLABELED).total_size == len(got)
        return [r.image_id for r in got]

    ids = add_images(index, 6)
    index.bulk_import(
        [], [LabelImport(ids[0], "final", ".nii", SHA_A, 1, {}), LabelImport(ids[1], "x", ".nii", SHA_A, 1, {})]
    )
    assert unlabeled() == ids[1:]
    index.upsert_label(ids[2], "final", ".nii", SHA_A, 1, {})
    index.upsert_label(ids[2], "final", ".nii", SHA_B, 2, {})  # replace keeps it labeled
    assert unlabeled() == [ids[1], ids[3], ids[4], ids[5]]
    index.delete_label(ids[0], "final")
    index.delete_labels([(ids[2], "final"), (ids[1], "x")])
    assert unlabeled() == ids
    index.upsert_label(ids[5], "final", ".nii", SHA_A, 1, {})
    index.upsert_image(ids[5], ".nii", SHA_B, 3, {})  # re-upload keeps labels
    assert unlabeled() == ids[:5] and index.status().completed == 1
    got = index.acquire_next_lease("c", "rnd", order=ImageOrder.RANDOM, ttl_seconds=60, now=T0)
    assert got is not None and got[0].image_id != ids[5]


def test_schema_v1_is_migrated(tmp_path: Any) -> None:
    import sqlite3

    url = f"sqlite:///{tmp_path}/index.db"
    with SqlIndex(url) as ix:
        add_images(ix, 3)
        ix.upsert_label("img_001", "final", ".nii", SHA_A, 1, {})
    db = sqlite3.connect(tmp_path / "index.db")
    db.executescript(
        "DROP INDEX ix_images_final_id; DROP INDEX ix_images_final_rand; ALTER TABLE images DROP COLUMN final;"
        "UPDATE labelgrid_meta SET value = '1' WHERE key = 'schema_version'; DROP TABLE alembic_version;"
    )  # as a datastore from before the migrations left it (tests/unit/test_datastore_migrations.py)
    db.close()
    with SqlIndex(url) as ix:
        assert [r.image_id for r in ix.list_images(filter=ImageFilter.UNLABELED).items] == ["img_000", "img_002"]
        assert ix.status().completed == 1


def test_score_order_puts_unscored_last(index: SqlIndex) -> None:
    ids = add_images(index, 9)
    scores = {ids[3]: 0.9, ids[5]: 0.5, ids[1]: 0.5, ids[8]: 0.1, ids[0]: -2.0}
    for i, v in scores.items():
        index.set_score(i, "epistemic_entropy", v)
    index.set_score(ids[2], "dice", 5.0)  # another key does not count
    expected = [ids[3], ids[1], ids[5], ids[8], ids[0], ids[2], ids[4], ids[6], ids[7]]
    for size in (1, 2, 3, 4, 5, 100):  # page boundaries everywhere, also across the two runs

        def fetch(token: str, size: int = size) -> Page[ImageRecord]:
            return index.list_images(
                order=ImageOrder.SCORE_DESC, score_key="epistemic_entropy", page_size=size, page_token=token
            )

        got = all_pages(fetch)
        assert [r.image_id for r in got] == expected, size
    first = index.list_images(order=ImageOrder.SCORE_DESC, score_key="epistemic_entropy", page_size=1)
    assert first.total_size == 9 and first.items[0].scores == {"epistemic_entropy": 0.9}
    with pytest.raises(InvalidArgument):
        index.list_images(order=ImageOrder.SCORE_DESC)
    with pytest.raises(InvalidArgument):
        index.set_score(ids[0], "x", float("nan"))
    with pytest.raises(NotFound):
        index.set_score("ghost", "x", 1.0)
    # A score may also merge keys into the info (MONAI Label keeps scores there).
    index.set_score(ids[0], "epistemic_entropy", 0.3, info={"epistemic_entropy": 0.3, "epistemic_ts": 7})
    assert index.get_scores(ids[0]) == {"epistemic_entropy": 0.3}
    assert index.get_image(ids[0]).info["epistemic_ts"] == 7


def test_random_order_pages_through_everything_once(index: SqlIndex) -> None:
    ids = add_images(index, 30)
    firsts = set()
    for _ in range(6):
        got = all_pages(lambda t: index.list_images(order=ImageOrder.RANDOM, page_size=7, page_token=t))
        assert sorted(r.image_id for r in got) == ids
        firsts.add(got[0].image_id)
    assert len(firsts) > 1  # not the same start every time (p(fail) ~ 1e-8)


def test_exclude_leased(index: SqlIndex) -> None:
    ids = add_images(index, 4)
    index.acquire_next_lease("c1", "first", ttl_seconds=10, now=T0)
    page = index.list_images(exclude_leased=True, now=T0 + 1)
    assert [r.image_id for r in page.items] == ids[1:] and page.total_size == 3
    assert len(index.list_images(exclude_leased=True, now=T0 + 11).items) == 4  # expired


# ---------------------------------------------------------------- concurrency


def test_concurrent_info_writers_lose_nothing(index_url: str) -> None:
    # Two index instances (as two replicas would be) and 24 threads, merging distinct keys.
    a, b = SqlIndex(index_url), SqlIndex(index_url)
    try:
        a.upsert_image("hot", ".nii", SHA_A, 1, {"base": 0})
        rounds = 4

        def writer(i: int) -> None:
            ix = a if i % 2 else b
            for r in range(rounds):
                ix.update_image_info("hot", {f"w{i}_{r}": r})

        run_threads(24, writer)
        rec = a.get_image("hot")
        assert len(rec.info) == 1 + 24 * rounds
        assert rec.revision == 1 + 24 * rounds
    finally:
        a.close()
        b.close()


def test_concurrent_lease_acquisition_never_double_leases(index_url: str) -> None:
    a, b = SqlIndex(index_url), SqlIndex(index_url)
    try:
        ids = add_images(a, 20)
        a.upsert_label(ids[0], "final", ".nii", SHA_A, 1, {})  # labeled: never a candidate

        def acquire(i: int) -> list[str]:
            ix = a if i % 2 else b
            got = []
            for n in range(3):
                res = ix.acquire_next_lease(f"client{i}-{n}", "first", ttl_seconds=60, now=T0)
                if res is not None:
                    got.append(res[0].image_id)
            return got

        leased = [x for xs in run_threads(10, acquire) for x in xs]
        assert len(leased) == 19 and len(set(leased)) == 19  # 30 tries, 19 candidates, no duplicates
        assert ids[0] not in leased
        live = all_pages(lambda t: a.list_leases(page_size=5, page_token=t, now=T0))
        assert sorted(x.image_id for x in live) == sorted(leased)
        assert Counter(x.image_id for x in live).most_common(1)[0][1] == 1
        assert a.no_lease_reason(now=T0) == "ALL_LEASED"
    finally:
        a.close()
        b.close()


def test_concurrent_acquisition_with_random_and_score_orders(index: SqlIndex) -> None:
    ids = add_images(index, 12)
    for n, i in enumerate(ids):
        if n % 2:
            index.set_score(i, "s", float(n))

    def acquire(i: int) -> list[str]:
        order = ImageOrder.RANDOM if i % 2 else ImageOrder.SCORE_DESC
        got = []
        for n in range(3):
            res = index.acquire_next_lease(f"c{i}-{n}", "x", order=order, score_key="s", ttl_seconds=60, now=T0)
            if res is not None:
                got.append(res[0].image_id)
        return got

    leased = [x for xs in run_threads(6, acquire) for x in xs]
    assert sorted(leased) == ids


# ---------------------------------------------------------------- leases


def test_lease_rules(index: SqlIndex) -> None:
    assert index.acquire_next_lease("c1", "first", ttl_seconds=10, now=T0) is None
    assert index.no_lease_reason() == "EMPTY"
    ids = add_images(index, 3)
    img, lease = index.acquire_next_lease("c1", "first", ttl_seconds=10, now=T0) or pytest.fail("no lease")
    assert img.image_id == ids[0] and lease.client_id == "c1" and lease.strategy == "first"
    assert (lease.expire_time - lease.acquire_time).total_seconds() == pytest.approx(10)

    # The same client asking again under the same strategy gives up its previous lease
    # first; by id that is the same, still unlabeled image (MONAI Label's "first").
    img2, _ = index.acquire_next_lease("c1", "first", ttl_seconds=10, now=T0 + 1) or pytest.fail()
    assert img2.image_id == ids[0] and index.list_leases(now=T0 + 1).total_size == 1
    # Another strategy is another lease.
    img3, _ = index.acquire_next_lease("c1", "random", ttl_seconds=10, now=T0 + 1) or pytest.fail()
    assert img3.image_id == ids[1]
    img4, _ = index.acquire_next_lease("c2", "first", ttl_seconds=10, now=T0 + 1) or pytest.fail()
    assert img4.image_id == ids[2]
    assert index.acquire_next_lease("c3", "first", ttl_seconds=10, now=T0 + 2) is None
    assert index.no_lease_reason(now=T0 + 2) == "ALL_LEASED"
    assert [x.image_id for x in index.list_leases("c1", now=T0 + 2).items] == [ids[0], ids[1]]

    # Renew, release; NOT_FOUND (LEASE_NOT_FOUND) for a lease the client does not hold.
    renewed = index.renew_lease(ids[0], "c1", 100, now=T0 + 5)
    assert renewed.expire_time.timestamp() == pytest.approx(T0 + 105)
    with pytest.raises(NotFound) as err:
        index.renew_lease(ids[0], "c2", 100, now=T0 + 5)
    assert err.value.reason == "LEASE_NOT_FOUND" and ids[0] in err.value.message
    with pytest.raises(NotFound):
        index.release_lease(ids[1], "c2", now=T0 + 5)
    index.release_lease(ids[1], "c1", now=T0 + 5)
    with pytest.raises(NotFound):
        index.release_lease(ids[1], "c1", now=T0 + 5)  # already released
    with pytest.raises(NotFound):
        index.renew_lease(ids[2], "c2", 10, now=T0 + 11.5)  # expired, even if not taken over

    # Expiry: at T0+12 the leases of ids[2] (c2) expired; ids[0] was renewed.
    img5, _ = index.acquire_next_lease("c3", "first", ttl_seconds=10, now=T0 + 12) or pytest.fail()
    assert img5.image_id == ids[1]
    img6, _ = index.acquire_next_lease("c4", "first", ttl_seconds=10, now=T0 + 12) or pytest.fail()
    assert img6.image_id == ids[2]  # taken over from the expired lease of c2
    with pytest.raises(NotFound):
        index.renew_lease(ids[2], "c2", 10, now=T0 + 12)  # it was taken over
    assert index.expire_leases(now=T0 + 1000) == 3
    assert index.list_leases(now=T0).total_size == 0
    with pytest.raises(InvalidArgument):
        index.acquire_next_lease("c1", "first", ttl_seconds=0)
    with pytest.raises(InvalidArgument):
        index.acquire_next_lease("", "first", ttl_seconds=5)


def test_final_label_releases_lease(index: SqlIndex) -> None:
    ids = add_images(index, 2)
    index.acquire_next_lease("c1", "first", ttl_seconds=60, now=T0)
    index.upsert_label(ids[0], "original", ".nii", SHA_A, 1, {})  # a prediction does not
    assert index.list_leases(now=T0).total_size == 1
    index.upsert_label(ids[0], "final", ".nii", SHA_A, 1, {})
    assert index.list_leases(now=T0).total_size == 0
    img, _ = index.acquire_next_lease("c1", "first", ttl_seconds=60, now=T0) or pytest.fail()
    assert img.image_id == ids[1]
    index.upsert_label(ids[1], "final", ".nii", SHA_A, 1, {})
    assert index.acquire_next_lease("c1", "first", ttl_seconds=60, now=T0) is None
    assert index.no_lease_reason() == "ALL_LABELED"
    # Candidates under another tag.
    img, _ = index.acquire_next_lease("c1", "review", tag="reviewer1", ttl_seconds=60, now=T0) or pytest.fail()
    assert img.image_id == ids[0]


def test_lease_orders_and_mark_in_info(index: SqlIndex) -> None:
    ids = add_images(index, 5)
    index.set_score(ids[3], "epistemic_entropy", 0.9)
    index.set_score(ids[1], "epistemic_entropy", 0.8)
    index.upsert_label(ids[3], "final", ".nii", SHA_A, 1, {})
    got = index.acquire_next_lease(
        "c1",
        "Epistemic",
        order=ImageOrder.SCORE_DESC,
        score_key="epistemic_entropy",
        ttl_seconds=60,
        now=T0,
        mark_in_info=True,
    )
    img, _ = got or pytest.fail()
    assert img.image_id == ids[1]  # ids[3] scores higher but is labeled
    assert img.info["strategy"] == {"Epistemic": {"ts": int(T0), "client_id": "c1"}}
    index.acquire_next_lease("c2", "first", ttl_seconds=60, now=T0, mark_in_info=True)
    index.acquire_next_lease("c1", "first", ttl_seconds=60, now=T0 + 1, mark_in_info=True)
    assert set(index.get_image(ids[0]).info["strategy"]) == {"first"}  # c2 holds ids[0]
    # Left: only ids[4] (ids[3] labeled, ids[0..2] leased).
    img, _ = index.acquire_next_lease("r1", "random", order=ImageOrder.RANDOM, ttl_seconds=60, now=T0) or pytest.fail()
    assert img.image_id == ids[4]
    assert index.acquire_next_lease("r2", "random", order=ImageOrder.RANDOM, ttl_seconds=60, now=T0) is None


# ---------------------------------------------------------------- models


def test_model_versions_numbering_under_concurrency(index: SqlIndex) -> None:
    with pytest.raises(NotFound) as err:
        index.get_model("seg")
    assert err.value.reason == "MODEL_NOT_FOUND"
    recs = run_threads(10, lambda i: index.add_model_version("seg", None, "model.pt", SHA_A, i, {"dice": i}, {}))
    assert sorted(r.version for r in recs) == [f"v{n:06d}" for n in range(1, 11)]
    versions = all_pages(lambda t: index.list_model_versions("seg", page_size=3, page_token=t))
    assert [v.version for v in versions] == [f"v{n:06d}" for n in range(10, 0, -1)]  # newest first
    assert index.get_model("seg").latest_version == "v000010"

    index.add_model_version("seg", "v000012", "model.pt", SHA_A, 1)  # explicit
    with pytest.raises(AlreadyExists):
        index.add_model_version("seg", "v000012", "model.pt", SHA_A, 1)
    assert index.add_model_version("seg", None, "m.pt", SHA_A, 1).version == "v000013"  # skips the taken name
    index.delete_model_version("seg", "v000013")
    assert index.add_model_version("seg", None, "m.pt", SHA_A, 1).version == "v000014"  # never reused
    with pytest.raises(NotFound):
        index.get_model_version("seg", "v000013")
    assert index.get_model_version("seg", "v000003") == next(r for r in recs if r.version == "v000003")
    with pytest.raises(NotFound):
        index.list_model_versions("nope")

    index.add_model_version("deepedit", None, "model.pt", SHA_A, 1)
    models = all_pages(lambda t: index.list_models(page_size=1, page_token=t))
    assert [(m.model, m.latest_version) for m in models] == [("deepedit", "v000001"), ("seg", "v000014")]


def test_pin_and_unpin(index: SqlIndex) -> None:
    for _ in range(3):
        index.add_model_version("seg", None, "model.pt", SHA_A, 1)
    with pytest.raises(NotFound):
        index.pin_model_version("seg", "v000099")
    with pytest.raises(NotFound):
        index.pin_model_version("ghost", "v000001")
    m = index.pin_model_version("seg", "v000002")
    assert (m.pinned_version, m.latest_version, m.serving_version) == ("v000002", "v000003", "v000002")
    with pytest.raises(FailedPrecondition):
        index.delete_model_version("seg", "v000002")
    m = index.pin_model_version("seg", None)
    assert m.pinned_version is None and m.serving_version == "v000003"
    assert index.delete_model_version("seg", "v000002").version == "v000002"


# ---------------------------------------------------------------- records


def test_records_cas(index: SqlIndex) -> None:
    r = index.put_record("trainingJobs", "j1", {"state": "QUEUED"}, expected_revision=-1)
    assert (r.revision, r.data) == (1, {"state": "QUEUED"})
    with pytest.raises(Aborted):
        index.put_record("trainingJobs", "j1", {"state": "X"}, expected_revision=-1)
    with pytest.raises(Aborted):
        index.put_record("trainingJobs", "j1", {"state": "X"}, expected_revision=7)
    r = index.put_record("trainingJobs", "j1", {"state": "RUNNING"}, expected_revision=1)
    assert r.revision == 2 and r.update_time >= r.create_time
    assert index.put_record("trainingJobs", "j1", {"state": "DONE"}).revision == 3  # unconditional
    with pytest.raises(NotFound) as err:
        index.put_record("trainingJobs", "j9", {}, expected_revision=2)
    assert err.value.reason == "RECORD_NOT_FOUND"

    # CAS loop from many threads: every increment lands exactly once.
    index.put_record("counters", "c", {"n": 0})

    def bump(_: int) -> None:
        for _ in range(3):
            while True:
                cur = index.get_record("counters", "c")
                try:
                    index.put_record("counters", "c", {"n": cur.data["n"] + 1}, expected_revision=cur.revision)
                    break
                except Aborted:
                    continue

    run_threads(8, bump)
    assert index.get_record("counters", "c").data == {"n": 24}

    for i in range(5):
        index.put_record("stats", f"s{i}", {"i": i})
    got = all_pages(lambda t: index.list_records("stats", page_size=2, page_token=t))
    assert [x.record_id for x in got] == [f"s{i}" for i in range(5)]
    assert index.delete_record("stats", "s0").data == {"i": 0}
    with pytest.raises(NotFound):
        index.get_record("stats", "s0")
    with pytest.raises(NotFound):
        index.delete_record("stats", "s0")


# ---------------------------------------------------------------- export, reindex, errors


def test_export_bulk_import_and_clear(index: SqlIndex) -> None:
    images = [
        ImageImport(f"case_{i:05d}", ".nii.gz", SHA_A, i, {"ts": 1, "name": f"case_{i:05d}.nii.gz"})
        for i in range(3000)
    ]
    labels = [LabelImport(f"case_{i:05d}", "final", ".nii.gz", SHA_B, 1, {"ts": 2}) for i in range(0, 3000, 2)]
    labels.append(LabelImport("orphan", "final", ".nii.gz", SHA_B, 1, {}))
    res = index.bulk_import(images, labels)
    assert (res.images_added, res.labels_added, res.labels_skipped) == (3000, 1500, 1)
    st = index.status()
    assert (st.total, st.completed) == (3000, 1500)

    model = index.export_monailabel_model()
    assert set(model) == {"name", "description", "images_dir", "labels_dir", "objects"}
    assert (model["name"], model["description"], model["images_dir"], model["labels_dir"]) == (
        "new-dataset",
        "New Dataset",
        ".",
        "labels",
    )
    assert model["objects"]["case_00000"] == {
        "image": {"ext": ".nii.gz", "info": {"ts": 1, "name": "case_00000.nii.gz"}},
        "labels": {"final": {"ext": ".nii.gz", "info": {"ts": 2, "name": "case_00000.nii.gz"}}},
    }
    assert model["objects"]["case_00001"]["labels"] == {}
    assert list(model["objects"]) == sorted(model["objects"])

    # A reindex of an unchanged store changes nothing; a changed file is updated.
    images[5] = ImageImport("case_00005", ".nii.gz", SHA_B, 5, {"ts": 1, "name": "case_00005.nii.gz"})
    res = index.bulk_import(images, labels[:-1])
    assert (res.images_added, res.images_updated, res.images_unchanged) == (0, 1, 2999)
    assert (res.labels_added, res.labels_updated, res.labels_unchanged) == (0, 0, 1500)
    assert index.get_image("case_00005").revision == 2
    assert index.delete_images(["case_00000", "case_00001", "nope"]) == 2
    assert index.delete_labels([("case_00002", "final"), ("case_00003", "final")]) == 1
    assert index.status().completed == 1498

    index.add_model_version("seg", None, "m.pt", SHA_A, 1)
    index.put_record("jobs", "j", {})
    index.clear()
    assert index.status().total == 0 and index.status().label_tags == {}
    assert index.get_model("seg").latest_version == "v000001"  # models kept by default
    assert index.get_record("jobs", "j").revision == 1  # records are never cleared
    index.clear(models=True)
    with pytest.raises(NotFound):
        index.get_model("seg")


def test_unreachable_database_is_a_storage_error(tmp_path: Any) -> None:
    with pytest.raises(StorageError) as err:
        SqlIndex(f"postgresql+psycopg:///nodb?host={tmp_path}/nosocket&connect_timeout=2")
    assert err.value.reason == "STORAGE_ERROR" and "index" in err.value.message
    with pytest.raises(InvalidArgument):
        SqlIndex("mysql://x/y")
    with pytest.raises(InvalidArgument):
        SqlIndex("sqlite://")


def test_index_reopens_existing_file(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/sub/dir/index.db"
    with SqlIndex(url) as ix:
        ix.upsert_image("a", ".nii", SHA_A, 1, {"k": "v"})
    with SqlIndex(url) as ix:
        assert ix.get_image("a").info == {"k": "v"} and ix.backend == "sqlite"
