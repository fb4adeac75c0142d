"""The datastore is metered at its ports: every BlobStore and Index method, explicitly."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from services.common.errors import NotFound, StorageError
from services.datastore.adapters.blobs import LocalBlobStore
from services.datastore.adapters.index import SqlIndex
from services.datastore.adapters.metered import MeteredBlobStore, MeteredIndex
from services.datastore.adapters.metrics import DatastoreMetrics
from services.datastore.domain.ports import BlobStore, Index


def protocol_methods(protocol: type) -> list[str]:
    return sorted(
        name
        for name, value in vars(protocol).items()
        if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))
    )


class BrokenPort:
    """A port whose every call fails in the store (e.g. the database went away)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def fail(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            raise StorageError(f"{name} failed")

        return fail


def errors(registry: CollectorRegistry, operation: str) -> float:
    value = registry.get_sample_value("labelgrid_datastore_store_errors_total", {"operation": operation})
    return value or 0.0


def call_with_dummies(method: Callable[..., Any]) -> None:
    """Calls a wrapper method with an argument of the right shape for each required parameter."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for p in inspect.signature(method).parameters.values():
        if p.default is not inspect.Parameter.empty:
            continue
        value: Any = {
            "path": Path("/nonexistent"),
            "info": {},
            "data": {},
            "images": [],
            "image_ids": [],
            "keys": [],
        }.get(p.name, 1.0 if p.name in ("ttl_seconds", "value") else "x")
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            kwargs[p.name] = value
        else:
            args.append(value)
    method(*args, **kwargs)


@pytest.mark.parametrize(
    ("protocol", "wrapper", "port"), [(BlobStore, MeteredBlobStore, "blobs"), (Index, MeteredIndex, "index")]
)
def test_every_port_method_is_metered(protocol: type, wrapper: type, port: str) -> None:
    methods = protocol_methods(protocol)
    assert len(methods) >= (9 if port == "blobs" else 30)
    # Declared on the wrapper itself: nothing reaches the inner port by attribute fallthrough.
    missing = [name for name in methods if name not in vars(wrapper)]
    assert not missing, f"{wrapper.__name__} does not implement {missing}"
    registry = CollectorRegistry()
    inner = BrokenPort()
    metered = wrapper(inner, DatastoreMetrics(registry))
    for name in methods:
        if name == "backend":
            continue  # a property: no store call to fail
        with pytest.raises(StorageError):
            call_with_dummies(getattr(metered, name))
        assert inner.calls[-1] == name, f"{name} did not call the port's {name}"
        assert errors(registry, f"{port}.{name}") == 1.0, f"{port}.{name} was not counted"


def test_client_errors_are_not_store_errors(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    with SqlIndex(f"sqlite:///{tmp_path / 'index.db'}") as sql:
        index = MeteredIndex(sql, DatastoreMetrics(registry))
        assert index.backend == "sqlite"
        with pytest.raises(NotFound):
            index.get_image("nope")
        assert errors(registry, "index.get_image") == 0.0


def test_blob_bytes_are_counted_by_kind(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    blobs = MeteredBlobStore(LocalBlobStore(tmp_path / "store"), DatastoreMetrics(registry))
    data = b"x" * 3000
    for key in ("images/a.nii.gz", "labels/final/a.nii.gz", "models/seg/v1/m.pt"):
        src = blobs.spool_dir() / "upload"
        src.write_bytes(data)
        blobs.put_file(key, src, sha256=hashlib.sha256(data).hexdigest())
    stream = blobs.open_read("labels/final/a.nii.gz", 1000)
    assert b"".join(stream) == data[1000:]

    def sample(name: str, kind: str) -> float | None:
        return registry.get_sample_value(name, {"kind": kind})

    assert [sample("labelgrid_datastore_bytes_received_total", k) for k in ("images", "labels", "model_versions")] == [
        3000.0,
        3000.0,
        3000.0,
    ]
    assert sample("labelgrid_datastore_bytes_sent_total", "labels") == 2000.0
    assert sample("labelgrid_datastore_bytes_sent_total", "images") == 0.0
    with pytest.raises(NotFound):
        blobs.open_read("images/missing.nii.gz")
    assert errors(registry, "blobs.open_read") == 0.0  # NOT_FOUND is the caller's, not the store's
    assert [b.key for b in blobs.list("labels/")] == ["labels/final/a.nii.gz"]
