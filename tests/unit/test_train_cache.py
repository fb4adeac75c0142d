"""The training service's image cache on disk: what a killed service left half-downloaded is
removed, and trimming to the byte budget never touches a download in progress."""

from __future__ import annotations

import os
from pathlib import Path

from services.common.datastore_client import DatastoreClient
from services.train.adapters.data import FETCH_PREFIX, DataCache


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
