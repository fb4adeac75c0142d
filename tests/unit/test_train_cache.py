"""The training service's image cache on disk: what a killed service left half-downloaded is
removed, and trimming to the byte budget never touches a download in progress, a file a
running job holds, or one a fetch touched while the trim ran."""

from __future__ import annotations

import os
from pathlib import Path

from services.common.datastore_client import DatastoreClient
from services.train.adapters.data import FETCH_PREFIX, DataCache, _files


def _cached(cache_dir: Path, sha: str, size: int, age: int) -> Path:
    path = cache_dir / sha[:2] / f"{sha}.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (1_000_000 + age, 1_000_000 + age))
    return path


def test_leftover_downloads_are_removed_and_never_trimmed_or_counted(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    leftover = cache_dir / f"{FETCH_PREFIX}killed" / "blob"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    # The datastore is never called by what this test does.
    cache = DataCache(DatastoreClient("127.0.0.1:9"), cache_dir, budget_bytes=250)
    assert not leftover.parent.exists()

    old = _cached(cache_dir, "aa" + "0" * 62, 100, age=1)
    kept = _cached(cache_dir, "bb" + "0" * 62, 100, age=2)
    new = _cached(cache_dir, "cc" + "0" * 62, 100, age=3)
    in_progress = cache_dir / f"{FETCH_PREFIX}now" / "blob"
    in_progress.parent.mkdir()
    in_progress.write_bytes(b"y" * 1000)
    assert cache.cached_bytes() == 300

    cache._trim(keep={kept})
    assert not old.exists() and kept.exists() and new.exists()  # oldest first, the job's files kept
    assert in_progress.read_bytes() == b"y" * 1000


def test_a_trim_spares_what_running_jobs_hold_until_they_release_it(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache = DataCache(DatastoreClient("127.0.0.1:9"), cache_dir, budget_bytes=100)
    first_job = _cached(cache_dir, "aa" + "0" * 62, 100, age=1)
    both_jobs = _cached(cache_dir, "bb" + "0" * 62, 100, age=2)
    second_job = _cached(cache_dir, "cc" + "0" * 62, 100, age=3)
    one = [{"image": str(first_job), "label": str(both_jobs), "image_id": "x"}]
    two = [{"image": str(second_job), "label": str(both_jobs), "image_id": "y"}]
    cache._in_use.update(_files(one) + _files(two))  # as labeled_datalist registers them

    cache._trim(frozenset(cache._in_use))
    assert first_job.exists() and both_jobs.exists() and second_job.exists()  # over budget, all held

    cache.release(one)
    cache._trim(frozenset(cache._in_use))
    assert not first_job.exists() and both_jobs.exists() and second_job.exists()
    cache.release(two)
    assert not cache._in_use
    cache._trim(frozenset(cache._in_use))
    assert not both_jobs.exists() and second_job.exists()  # oldest first, down to the budget


def test_a_file_touched_while_the_trim_runs_is_not_taken(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache = DataCache(DatastoreClient("127.0.0.1:9"), cache_dir, budget_bytes=0)
    old = _cached(cache_dir, "aa" + "0" * 62, 100, age=1)
    fetched_now = _cached(cache_dir, "bb" + "0" * 62, 100, age=2)
    os.utime(fetched_now)  # another job's hit or download, as the trim starts
    cache._trim(frozenset())
    assert not old.exists() and fetched_now.exists()
