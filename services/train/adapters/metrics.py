"""Training's domain metrics, read from the live domain objects when Prometheus scrapes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.jobs import STATES as JOB_STATES

# The `state` label values: the job states in lower case.
STATES = tuple(state.lower() for state in JOB_STATES)


class TrainingCollector(Collector):
    """Jobs per state, queue length, busy devices, progress of running jobs, cache and publishing."""

    def __init__(self, training: Any, cache: Any) -> None:
        self.training = training
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "labelgrid_training_jobs", "Training jobs known to the datastore, by state.", labels=["state"]
        )
        counts = Counter(state.lower() for state, _trainer in self.training.states.values())
        for state in STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily(
            "labelgrid_training_queue_length", "Jobs waiting for devices.", value=self.training.queue_length()
        )
        busy = GaugeMetricFamily("labelgrid_training_devices_busy", "Device slots running a job.", labels=["device"])
        total = GaugeMetricFamily("labelgrid_training_devices_total", "Device slots jobs can use.", labels=["device"])
        totals = self.training.pool.totals()
        for device, used in self.training.pool.busy().items():
            busy.add_metric([device], used)
            total.add_metric([device], totals.get(device, 0))
        yield from (busy, total)

        epoch = GaugeMetricFamily("labelgrid_training_epoch", "Current epoch of the running job.", labels=["trainer"])
        loss = GaugeMetricFamily("labelgrid_training_loss", "Training loss of the last iteration.", labels=["trainer"])
        best = GaugeMetricFamily(
            "labelgrid_training_best_metric", "Best key metric of the running job.", labels=["trainer"]
        )
        remaining = GaugeMetricFamily(
            "labelgrid_training_estimated_remaining_seconds",
            "Estimated seconds until the running job ends.",
            labels=["trainer"],
        )
        for job_id, progress in list(self.training.last_progress.items()):
            trainer = self.training.states.get(job_id, ("", ""))[1]
            epoch.add_metric([trainer], progress.epoch)
            loss.add_metric([trainer], progress.loss)
            best.add_metric([trainer], progress.best_metric)
            remaining.add_metric([trainer], progress.estimated_remaining_seconds)
        yield from (epoch, loss, best, remaining)

        finished = CounterMetricFamily(
            "labelgrid_training_jobs_finished",
            "Jobs this process saw end, by trainer and state.",
            labels=["trainer", "state"],
        )
        for (trainer, state), count in self.training.finished.items():
            finished.add_metric([trainer, state.lower()], count)
        yield finished
        published = CounterMetricFamily(
            "labelgrid_training_model_versions_published",
            "Model versions published by this process.",
            labels=["trainer"],
        )
        for trainer, count in self.training.published.items():
            published.add_metric([trainer], count)
        yield published
        yield CounterMetricFamily(
            "labelgrid_training_cache_hits", "Images and labels found in the local cache.", value=self.cache.hits
        )
        yield CounterMetricFamily(
            "labelgrid_training_cache_misses", "Images and labels fetched from the datastore.", value=self.cache.misses
        )
        yield GaugeMetricFamily(
            "labelgrid_training_cache_bytes", "Bytes in the local image cache.", value=self.cache.cached_bytes()
        )
