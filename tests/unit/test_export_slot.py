"""The single-flight dataset export (Datastore.export_dataset): one archive at a time, but a
stalled one (neither built nor read for export_idle_seconds) gives up its slot, judged by the
datastore's clock, which this test moves instead of waiting."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from services.common.errors import ResourceExhausted
from services.datastore.app import build_datastore
from services.datastore.sample_studies import write_sample_studies
from services.datastore.settings import DatastoreSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_stalled_export_gives_up_its_slot_and_a_reader_that_resumes_still_gets_it(tmp_path: Path) -> None:
    write_sample_studies(tmp_path / "studies", count=2, labeled=2, size=16)
    clock = Clock()
    settings = DatastoreSettings(root=tmp_path / "studies", state_dir=tmp_path / "state", export_idle_seconds=300)
    store = build_datastore(settings, clock=clock)
    try:
        first = store.export_dataset()
        stalled_reader = first.open("rb")  # a stream that opened the archive, then stopped reading
        clock.now += 299
        store.export_progress()  # a chunk read keeps it alive
        clock.now += 299
        with pytest.raises(ResourceExhausted, match="already running"):
            store.export_dataset()
        clock.now += 2  # 301 s without progress: stalled
        second = store.export_dataset()
        assert second != first and second.exists() and not first.exists()
        with stalled_reader, zipfile.ZipFile(stalled_reader) as archive:  # resumes: the whole archive
            assert "metadata.json" in archive.namelist() and archive.testzip() is None
        with pytest.raises(ResourceExhausted):  # the new export holds the slot now
            store.export_dataset()
        second.unlink()
        store.export_dataset().unlink()  # once it is streamed and removed, the next one runs
    finally:
        store.close()
