"""Active learning's domain metrics, read from the live domain objects when Prometheus scrapes.

No label is ever an image, client or job id: strategies, outcomes, states and methods only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.activelearning.domain.model import NO_SAMPLE_REASONS
from services.common.jobs import STATES

# Next-sample outcomes as the domain counts them: "leased", or why no image was left.
OUTCOMES = ("leased", *(reason.lower() for reason in NO_SAMPLE_REASONS))
IMAGE_OUTCOMES = ("scored", "skipped", "failed")


class ActiveLearningCollector(Collector):
    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        sampler, scoring = self.service.sampler, self.service.scoring
        samples = CounterMetricFamily(
            "labelgrid_activelearning_next_sample",
            "Next-sample requests by strategy and outcome (leased, or why no image was left).",
            labels=["strategy", "outcome"],
        )
        counts = dict(sampler.outcomes)
        for strategy in sampler.app.strategies:
            for outcome in OUTCOMES:
                samples.add_metric([strategy, outcome], counts.get((strategy, outcome), 0))
        yield samples
        yield GaugeMetricFamily(
            "labelgrid_activelearning_leases",
            "Live next-sample leases (refreshed from the datastore every few seconds).",
            value=self.service.live_leases,
        )
        jobs = GaugeMetricFamily("labelgrid_activelearning_scoring_jobs", "Scoring jobs by state.", labels=["state"])
        for state in STATES:
            jobs.add_metric([state], scoring.states.get(state, 0))
        yield jobs
        scored = CounterMetricFamily(
            "labelgrid_activelearning_images_scored",
            "Images a scoring job scored, skipped (already scored with the served version) or failed to score.",
            labels=["method", "outcome"],
        )
        images = dict(scoring.images)
        for method in scoring.app.scoring_methods:
            for outcome in IMAGE_OUTCOMES:
                scored.add_metric([method, outcome], images.get((method, outcome), 0))
        yield scored
