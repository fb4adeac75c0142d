"""Lease TTLs a client asks the datastore for are bounded: negative, not finite or over a week is
INVALID_ARGUMENT (a lease hides an image from every other annotator), nothing is leased."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.datastore.app import build_datastore
from services.datastore.domain import limits
from services.datastore.domain.datastore import Datastore
from services.datastore.sample_studies import write_sample_studies
from services.datastore.settings import DatastoreSettings


@pytest.fixture
def datastore(tmp_path: Path) -> Iterator[Datastore]:
    write_sample_studies(tmp_path / "studies", count=2, labeled=0, size=8)
    store = build_datastore(
        DatastoreSettings(
            backend="local", root=tmp_path / "studies", state_dir=tmp_path / "state", port=0, metrics_port=-1
        )
    )
    store.reindex()
    yield store
    store.close()


@pytest.mark.parametrize("ttl", [-1.0, math.nan, math.inf, limits.MAX_LEASE_TTL_SECONDS + 1, 1e300])
def test_lease_ttls_are_bounded(datastore: Datastore, ttl: float) -> None:
    with pytest.raises(InvalidArgument, match="ttl_seconds"):
        datastore.acquire_lease("client-a", "first", ttl_seconds=ttl)
    assert not datastore.list_leases().items
    got = datastore.acquire_lease("client-a", "first", ttl_seconds=limits.MAX_LEASE_TTL_SECONDS)
    assert not isinstance(got, str)
    image_id = got[0].image_id
    with pytest.raises(InvalidArgument, match="ttl_seconds"):
        datastore.renew_lease(image_id, "client-a", ttl_seconds=ttl)
    assert datastore.renew_lease(image_id, "client-a", ttl_seconds=60).image_id == image_id
