"""The datastore's domain metrics, on the service's registry (never the global one).

What the index knows (objects by kind, labels by tag, live leases, models) is read when
Prometheus scrapes, by `DatastoreCollector`: a few COUNT queries, no bookkeeping in the
domain. What no scrape can see afterwards (bytes moved, failed store calls) is counted as it
happens by `MeteredDatastore`, a thin wrapper the servicer is given instead of the
Datastore itself, so neither the domain nor the servicer carries metrics code.

No label value is ever an image, label, user or lease id: kinds, tags, model names and
operation (method) names only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.chunks import SpooledFile
from services.common.errors import LabelgridError, StorageError

log = logging.getLogger("labelgrid.datastore.metrics")

# Models listed per scrape at most (each costs one COUNT of its versions); models are few.
MAX_MODELS = 200

UPLOAD_KINDS = {"add_image": "images", "add_label": "labels", "add_model_version": "model_versions"}
DOWNLOAD_KINDS = {"read_image": "images", "read_label": "labels", "read_model_version": "model_versions"}


class DatastoreCollector(Collector):
    """Objects by kind, labels by tag, images with a final label, live leases and models."""

    def __init__(self, datastore: Any) -> None:
        self.datastore = datastore

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "labelgrid_datastore_index_up", "1 if the last scrape could read the index, 0 if it failed."
        )
        try:
            families = list(self._read())
        except Exception:  # a scrape must not fail because the index is down; up says so
            log.warning("could not read the index for metrics", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> Iterator[Metric]:
        ds = self.datastore
        status = ds.status()
        leases = ds.list_leases(page_size=1).total_size
        models, versions = self._models()

        objects = GaugeMetricFamily(
            "labelgrid_datastore_objects", "Objects in the datastore's index, by kind.", labels=["kind"]
        )
        objects.add_metric(["images"], status.total)
        objects.add_metric(["labels"], sum(status.label_tags.values()))
        objects.add_metric(["model_versions"], sum(versions.values()))
        yield objects

        labels = GaugeMetricFamily("labelgrid_datastore_labels", "Labels in the datastore, by label tag.", labels=["tag"])
        for tag, count in sorted(status.label_tags.items()):
            labels.add_metric([tag], count)
        yield labels

        yield GaugeMetricFamily(
            "labelgrid_datastore_images_labeled",
            "Images with a final (submitted) label: MONAI Label's 'completed'.",
            value=status.completed,
        )
        yield GaugeMetricFamily("labelgrid_datastore_leases", "Live (unexpired) image leases.", value=leases)
        yield GaugeMetricFamily("labelgrid_datastore_models", "Models with at least one published version.", value=models)
        per_model = GaugeMetricFamily(
            "labelgrid_datastore_model_versions", "Published versions of each model.", labels=["model"]
        )
        for name, count in sorted(versions.items()):
            per_model.add_metric([name], count)
        yield per_model

    def _models(self) -> tuple[int, dict[str, int]]:
        """How many models, and versions per model (the first MAX_MODELS models)."""
        page = self.datastore.list_models(page_size=MAX_MODELS)
        versions = {
            model.model: self.datastore.list_model_versions(model.model, page_size=1).total_size for model in page.items
        }
        return page.total_size, versions


class DatastoreMetrics:
    """Counters of what happens between scrapes: bytes in and out, failed store calls."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes_received = Counter(
            "labelgrid_datastore_bytes_received",
            "Bytes of uploads received (verified and handed to the store), by kind.",
            ["kind"],
            registry=registry,
        )
        self.bytes_sent = Counter(
            "labelgrid_datastore_bytes_sent",
            "Bytes of downloads read from the store and sent, by kind.",
            ["kind"],
            registry=registry,
        )
        self.store_errors = Counter(
            "labelgrid_datastore_store_errors",
            "Datastore operations that failed in the object store or the index (not client errors), by operation.",
            ["operation"],
            registry=registry,
        )
        for kind in UPLOAD_KINDS.values():
            self.bytes_received.labels(kind)
            self.bytes_sent.labels(kind)

    def store_failed(self, operation: str, error: BaseException) -> None:
        """Counts `error` if it is the store's fault: StorageError or anything unexpected."""
        if isinstance(error, StorageError) or not isinstance(error, LabelgridError):
            self.store_errors.labels(operation).inc()


class _CountingChunks:
    """A download's chunk iterator that counts the bytes it yields (and keeps close())."""

    def __init__(self, chunks: Iterator[bytes], counter: Any, on_error: Callable[[BaseException], None]) -> None:
        self._chunks, self._counter, self._on_error = chunks, counter, on_error

    def __iter__(self) -> _CountingChunks:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            raise
        except Exception as error:
            self._on_error(error)
            raise
        self._counter.inc(len(chunk))
        return chunk

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


class MeteredDatastore:
    """The Datastore, counting upload and download bytes and the store's failures per method.

    Every attribute is the Datastore's own; its public methods are wrapped.
    """

    def __init__(self, datastore: Any, metrics: DatastoreMetrics) -> None:
        self._datastore = datastore
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._datastore, name)
        if name.startswith("_") or not callable(value):
            return value
        metrics = self._metrics

        def call(*args: Any, **kwargs: Any) -> Any:
            if name in UPLOAD_KINDS and args and isinstance(args[0], SpooledFile):
                metrics.bytes_received.labels(UPLOAD_KINDS[name]).inc(args[0].size)
            try:
                result = value(*args, **kwargs)
            except Exception as error:
                metrics.store_failed(name, error)
                raise
            if name in DOWNLOAD_KINDS:
                counter = metrics.bytes_sent.labels(DOWNLOAD_KINDS[name])
                result = replace(
                    result, chunks=_CountingChunks(result.chunks, counter, lambda e: metrics.store_failed(name, e))
                )
            return result

        call.__name__ = name
        return call


def instrument(datastore: Any, registry: CollectorRegistry) -> MeteredDatastore:
    """Registers the datastore's metrics on `registry`; returns the Datastore to serve."""
    registry.register(DatastoreCollector(datastore))
    return MeteredDatastore(datastore, DatastoreMetrics(registry))
