"""ReindexResponse reports every skipped file in its count and lists a bounded few."""

from __future__ import annotations

from typing import Any, cast

from labelgrid.datastore.v1 import datastore_service_pb2 as pb

from services.datastore.api.servicer import REINDEX_SKIP_TEXT, REINDEX_SKIPS_LISTED, DatastoreServicer
from services.datastore.domain.reindex import ReindexCounts


class _Reindexes:
    def __init__(self, counts: ReindexCounts) -> None:
        self.counts = counts

    def reindex(self) -> ReindexCounts:
        return self.counts


async def test_a_bucket_of_bad_files_is_counted_in_full_and_listed_in_part() -> None:
    bad = [f"images/bad{n:04d}.nii.gz: not a gzip stream" for n in range(250)]
    skipped = (*bad, "images/long.nii.gz: " + "x" * 5000)
    counts = ReindexCounts(images=3, labels=1, model_versions=0, removed=2, skipped=skipped)
    servicer = DatastoreServicer(cast(Any, _Reindexes(counts)))
    answer = await servicer.Reindex(pb.ReindexRequest(), None)
    assert (answer.images, answer.labels, answer.removed, answer.skipped) == (3, 1, 2, 251)
    assert list(answer.skipped_files) == list(skipped[:REINDEX_SKIPS_LISTED])
    assert REINDEX_SKIPS_LISTED == 100

    counts = ReindexCounts(images=0, labels=0, model_versions=0, removed=0, skipped=skipped[-1:])
    answer = await DatastoreServicer(cast(Any, _Reindexes(counts))).Reindex(pb.ReindexRequest(), None)
    assert answer.skipped == 1 and answer.skipped_files == [skipped[-1][:REINDEX_SKIP_TEXT]]
    assert len(answer.skipped_files[0]) == REINDEX_SKIP_TEXT
