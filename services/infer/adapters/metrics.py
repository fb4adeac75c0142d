"""Inference's domain metrics, read from the live domain objects when Prometheus scrapes.

A collector rather than gauges updated on every change: the scheduler and the model cache
stay free of metrics code, and a scrape always sees their current state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class InferenceCollector(Collector):
    """Queue depth and wait per model and device, loaded models and their versions, device memory."""

    def __init__(self, inference: Any) -> None:
        self.inference = inference

    def collect(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily(
            "labelgrid_inference_queue_waiting", "Requests waiting for a device slot.", labels=["model", "device"]
        )
        running = GaugeMetricFamily(
            "labelgrid_inference_queue_running", "Requests running on a device.", labels=["model", "device"]
        )
        wait = GaugeMetricFamily(
            "labelgrid_inference_queue_estimated_wait_seconds",
            "Estimated wait of a new request, from recent run times.",
            labels=["model", "device"],
        )
        for stat in self.inference.queue_status():
            waiting.add_metric([stat.model, stat.device], stat.waiting)
            running.add_metric([stat.model, stat.device], stat.running)
            wait.add_metric([stat.model, stat.device], stat.estimated_wait_seconds)
        yield from (waiting, running, wait)

        cache = self.inference.cache
        served = GaugeMetricFamily(
            "labelgrid_inference_model_version_info",
            '1 for the model version loaded on a device ("untrained" before any is published).',
            labels=["model", "device", "version"],
        )
        load_seconds = GaugeMetricFamily(
            "labelgrid_inference_model_load_seconds",
            "Seconds the loaded model took to load and warm up.",
            labels=["model", "device"],
        )
        for model in self.inference.app.infer_tasks:
            for entry in cache.loaded(model):
                served.add_metric([model, entry.device, entry.version], 1)
                load_seconds.add_metric([model, entry.device], entry.load_seconds)
        yield from (served, load_seconds)
        yield GaugeMetricFamily(
            "labelgrid_inference_model_cache_bytes", "Bytes of model weights held in the cache.", value=cache.used_bytes
        )
        yield CounterMetricFamily(
            "labelgrid_inference_model_loads", "Model loads (first loads and hot reloads).", value=cache.load_count
        )

        memory = GaugeMetricFamily(
            "labelgrid_device_memory_used_bytes", "Memory this process uses on each device.", labels=["device"]
        )
        total = GaugeMetricFamily("labelgrid_device_memory_total_bytes", "Memory of each device.", labels=["device"])
        for device in self.inference.devices():
            memory.add_metric([device.name], device.memory_used_bytes)
            total.add_metric([device.name], device.memory_total_bytes)
        yield from (memory, total)
