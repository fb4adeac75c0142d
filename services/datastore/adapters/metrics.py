"""The datastore's domain metrics, on the service's registry (never the global one).

What the index knows (objects by kind, labels by tag, live leases, models) is read when
Prometheus scrapes, by `DatastoreCollector`: a few COUNT queries, no bookkeeping in the
domain. What no scrape can see afterwards (bytes moved, failed store calls) is counted as it
happens at the domain's two ports by `MeteredBlobStore` and `MeteredIndex` (metered.py),
which `instrument` puts in place of the ports, so neither the domain nor the servicer
carries metrics code.

No label value is ever an image, label, user or lease id: kinds, tags, model names and
operation (method) names only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.errors import LabelgridError, StorageError
from services.datastore.adapters.metered import KINDS, MeteredBlobStore, MeteredIndex
from services.datastore.domain.datastore import Datastore
from services.datastore.domain.ports import BlobStore, Index

log = logging.getLogger("labelgrid.datastore.metrics")

# Models listed per scrape at most (each costs one COUNT of its versions); models are few.
MAX_MODELS = 200


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

        labels = GaugeMetricFamily(
            "labelgrid_datastore_labels", "Labels in the datastore, by label tag.", labels=["tag"]
        )
        for tag, count in sorted(status.label_tags.items()):
            labels.add_metric([tag], count)
        yield labels

        yield GaugeMetricFamily(
            "labelgrid_datastore_images_labeled",
            "Images with a final (submitted) label: MONAI Label's 'completed'.",
            value=status.completed,
        )
        yield GaugeMetricFamily("labelgrid_datastore_leases", "Live (unexpired) image leases.", value=leases)
        yield GaugeMetricFamily(
            "labelgrid_datastore_models", "Models with at least one published version.", value=models
        )
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
            "Bytes of uploads received (verified and handed to the object store), by kind.",
            ["kind"],
            registry=registry,
        )
        self.bytes_sent = Counter(
            "labelgrid_datastore_bytes_sent",
            "Bytes read from the object store (downloads, dataset exports, digests of a reindex), by kind.",
            ["kind"],
            registry=registry,
        )
        self.store_errors = Counter(
            "labelgrid_datastore_store_errors",
            "Calls of the object store (blobs.*) or the index (index.*) that failed, not client errors, by operation.",
            ["operation"],
            registry=registry,
        )
        for kind in KINDS.values():
            self.bytes_received.labels(kind)
            self.bytes_sent.labels(kind)

    def store_failed(self, operation: str, error: BaseException) -> None:
        """Counts `error` if it is the store's fault: StorageError or anything unexpected."""
        if isinstance(error, StorageError) or not isinstance(error, LabelgridError):
            self.store_errors.labels(operation).inc()


def instrument(datastore: Datastore, registry: CollectorRegistry) -> Datastore:
    """Registers the datastore's metrics on `registry` and meters its two ports in place;
    returns the datastore to serve."""
    registry.register(DatastoreCollector(datastore))
    metrics = DatastoreMetrics(registry)
    blobs: BlobStore = MeteredBlobStore(datastore.blobs, metrics)
    index: Index = MeteredIndex(datastore.index, metrics)
    datastore.blobs, datastore.index = blobs, index
    return datastore
