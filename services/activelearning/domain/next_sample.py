"""Next sample with leases: every strategy hands out only images no other client holds.

The pick and the lease are one atomic step in the datastore (AcquireImageLease with the
strategy's order), so ten annotators asking at once under `first` get the first ten free
images, not the same one. The client's previous lease under the same strategy ends when it
asks again (it skipped that image); saving a final label ends it too (the datastore does
that in the same transaction as the save). Leases live in the datastore, so they survive a
restart of this service.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from apps.api.activelearning import Order, Strategy
from services.activelearning.domain.model import (
    ALL_LEASED,
    Lease,
    LeasePage,
    NextSample,
)
from services.activelearning.domain.ports import LeaseStore
from services.common.apps import LoadedApp
from services.common.errors import InvalidArgument, NotFound
from services.common.paging import page_size as checked_page_size

log = logging.getLogger("labelgrid.activelearning")

MAX_TTL_SECONDS = 7 * 24 * 3600
ACQUIRE_ATTEMPTS = 3  # an image deleted between its lease and its info mark: lease another


def check_client_id(client_id: str) -> str:
    if not client_id or not client_id.strip():
        raise InvalidArgument("client_id is required: the annotator asking (MONAI Label's client_id)")
    return client_id


class NextSampler:
    """The next-sample and lease use cases; counts outcomes per strategy for the metrics."""

    def __init__(self, app: LoadedApp, store: LeaseStore, default_ttl_seconds: int, label_tag: str = "final"):
        self.app = app
        self.store = store
        self.default_ttl_seconds = default_ttl_seconds
        self.label_tag = label_tag
        # (strategy, outcome) -> count; outcome is "leased" or a no-sample reason in lower case.
        self.outcomes: Counter[tuple[str, str]] = Counter()

    def strategy(self, name: str) -> Strategy:
        return self.app.lookup("strategies", name)

    def _ttl(self, ttl_seconds: int) -> int:
        if ttl_seconds < 0 or ttl_seconds > MAX_TTL_SECONDS:
            raise InvalidArgument(f"lease_ttl_seconds must be between 0 and {MAX_TTL_SECONDS} (got {ttl_seconds})")
        return ttl_seconds or self.default_ttl_seconds

    async def next_sample(
        self, strategy_name: str, client_id: str, params: dict[str, Any], ttl_seconds: int = 0
    ) -> NextSample:
        strategy = self.strategy(strategy_name)
        check_client_id(client_id)
        ttl = self._ttl(ttl_seconds)
        label_tag = str(params.get("label_tag") or strategy.label_tag or self.label_tag)
        for attempt in range(ACQUIRE_ATTEMPTS):
            acquired = await self.store.acquire(
                client_id, strategy_name, strategy.order.value, strategy.score_key, label_tag, ttl
            )
            if acquired.image is None or acquired.lease is None:
                reason = acquired.no_image_reason or ALL_LEASED
                self.outcomes[(strategy_name, reason.lower())] += 1
                return NextSample(None, None, {}, reason)
            image = acquired.image
            now = int(time.time())
            # MONAI Label records who was handed the image under which strategy, in the image info.
            marks = image.info.get("strategy")
            marks = dict(marks) if isinstance(marks, dict) else {}
            marks[strategy_name] = {"ts": now, "client_id": client_id}
            try:
                await self.store.update_info(image.image_id, {"strategy": marks})
                break
            except NotFound:
                # Deleted right after it was leased (its lease went with it): lease the next one.
                if attempt == ACQUIRE_ATTEMPTS - 1:
                    raise
        self.outcomes[(strategy_name, "leased")] += 1
        return NextSample(image, acquired.lease, self._strategy_info(strategy, image.scores, now), "")

    @staticmethod
    def _strategy_info(strategy: Strategy, scores: dict[str, float], now: int) -> dict[str, Any]:
        """The keys MONAI Label's strategies add to their answer."""
        if strategy.order is Order.RANDOM:
            return {"weight": now}
        if strategy.order is Order.SCORE and strategy.score_key in scores:
            return {strategy.score_key: scores[strategy.score_key]}
        return {}

    async def renew(self, image_id: str, client_id: str, ttl_seconds: int = 0) -> Lease:
        check_client_id(client_id)
        return await self.store.renew(image_id, client_id, self._ttl(ttl_seconds))

    async def release(self, image_id: str, client_id: str) -> None:
        check_client_id(client_id)
        await self.store.release(image_id, client_id)

    async def list_leases(self, client_id: str = "", page_size: int = 0, page_token: str = "") -> LeasePage:
        return await self.store.list_leases(client_id, checked_page_size(page_size), page_token)
