"""Per-device scheduling: bounded concurrency, a bounded queue, torch work in a pool per device.

The event loop only waits; every blocking call runs in the device's own thread pool, sized
to its concurrency, so one busy GPU never starves another and the loop stays free to move
bytes. A request that waits longer than its deadline, or whose caller hangs up, leaves the
queue at once; one that is already running is told to stop at its next stage boundary and
keeps its slot until its thread really finishes (torch cannot be interrupted mid-kernel,
and freeing the slot early would oversubscribe the device).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self, TypeVar

from services.common.errors import InvalidArgument, ResourceExhausted
from services.infer.domain.model import DeadlineExceeded, QueueStat

T = TypeVar("T")

_EMA_WEIGHT = 0.3


class DeviceQueue:
    """One device: `concurrency` slots, at most `queue_limit` waiting requests, one thread pool."""

    def __init__(self, device: str, concurrency: int, queue_limit: int):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.device = device
        self.concurrency = concurrency
        self.queue_limit = max(0, queue_limit)
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"torch-{device}")
        self._free = concurrency
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.waiting: dict[str, int] = defaultdict(int)
        self.running: dict[str, int] = defaultdict(int)
        self._seconds: dict[str, float] = {}

    @property
    def total_waiting(self) -> int:
        return len(self._waiters)

    @property
    def total_running(self) -> int:
        return self.concurrency - self._free

    def estimated_wait(self, model: str | None = None) -> float:
        """Seconds a request sent now would wait: the work ahead of it spread over the slots."""
        if self._free > 0 and not self._waiters:
            return 0.0
        typical = self._seconds.get(model or "", 0.0) or (
            sum(self._seconds.values()) / len(self._seconds) if self._seconds else 0.0
        )
        return (len(self._waiters) + self.total_running) * typical / self.concurrency

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next in line
                return
        self._free += 1

    def check_room(self) -> None:
        """Refuses now (QUEUE_FULL) when a request sent now could neither run nor wait: called
        before a request fetches its image, so a full queue costs it no download."""
        if not (self._free > 0 and not self._waiters) and len(self._waiters) >= self.queue_limit:
            self._refuse()

    def _refuse(self) -> None:
        raise ResourceExhausted(
            f"the queue of device {self.device} is full ({len(self._waiters)} waiting, "
            f"{self.total_running} running, limit {self.queue_limit}); retry later",
            reason="QUEUE_FULL",
            metadata={"device": self.device, "queue_limit": str(self.queue_limit)},
        )

    async def _acquire(self, model: str, deadline: float | None) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if len(self._waiters) >= self.queue_limit:
            self._refuse()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        self.waiting[model] += 1
        try:
            if deadline is None:
                await waiter
            else:
                async with asyncio.timeout_at(deadline):
                    await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot just as we gave up: pass it on
            else:
                waiter.cancel()
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            if isinstance(error, TimeoutError):
                raise DeadlineExceeded(f"the deadline passed while waiting for device {self.device}") from None
            raise
        finally:
            self.waiting[model] -= 1

    def slot(self, model: str, deadline: float | None = None) -> Slot:
        """`async with queue.slot(model, deadline) as slot:` waits for a slot, holds it for the block."""
        return Slot(self, model, deadline)

    async def run(
        self,
        model: str,
        work: Callable[[threading.Event], T],
        deadline: float | None = None,
    ) -> tuple[T, float]:
        """Queues for a slot, runs `work(cancelled)` in the device's pool; returns (result, queue seconds)."""
        async with self.slot(model, deadline) as slot:
            return await slot.run(work), slot.queue_seconds

    def record_seconds(self, model: str, seconds: float) -> None:
        """Feeds the running average behind `estimated_wait`."""
        previous = self._seconds.get(model)
        self._seconds[model] = seconds if previous is None else (1 - _EMA_WEIGHT) * previous + _EMA_WEIGHT * seconds

    def stats(self) -> list[QueueStat]:
        models = sorted(
            {m for m, n in self.waiting.items() if n} | {m for m, n in self.running.items() if n} | set(self._seconds)
        )
        return [
            QueueStat(
                model=model,
                device=self.device,
                waiting=self.waiting.get(model, 0),
                running=self.running.get(model, 0),
                queue_limit=self.queue_limit,
                estimated_wait_seconds=self.estimated_wait(model),
            )
            for model in models
        ]

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class Slot:
    """One held slot of a device. Blocking work runs through `run`; the slot is released when
    the block ends, or, if the caller was cancelled mid-work, when that work's thread ends.
    """

    def __init__(self, queue: DeviceQueue, model: str, deadline: float | None):
        self.queue = queue
        self.model = model
        self.deadline = deadline
        self.queue_seconds = 0.0
        self._pending: asyncio.Future[Any] | None = None

    async def __aenter__(self) -> Self:
        queued_at = time.monotonic()
        await self.queue._acquire(self.model, self.deadline)
        self.queue_seconds = time.monotonic() - queued_at
        self.queue.running[self.model] += 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pending = self._pending
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _f: self._release())
        else:
            self._release()

    def _release(self) -> None:
        self.queue.running[self.model] -= 1
        self.queue._release()

    async def run(self, work: Callable[[threading.Event], T]) -> T:
        """Runs `work(cancelled)` on the device's pool; on cancellation sets `cancelled` and re-raises."""
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()
        started = time.monotonic()
        future = loop.run_in_executor(self.queue.executor, work, cancelled)
        self._pending = future
        try:
            # Shielded: cancelling the caller must not mark the still-running thread done.
            result = await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        self.queue.record_seconds(self.model, time.monotonic() - started)
        return result


class Scheduler:
    """All device queues; picks the device of a request."""

    def __init__(self, devices: Sequence[str], concurrency: dict[str, int] | int, queue_limit: int):
        if not devices:
            raise ValueError("at least one device is needed")
        self.queues: dict[str, DeviceQueue] = {}
        for device in devices:
            slots = concurrency if isinstance(concurrency, int) else concurrency.get(device, 1)
            self.queues[device] = DeviceQueue(device, slots, queue_limit)

    @property
    def devices(self) -> list[str]:
        return list(self.queues)

    def pick(self, requested: str = "") -> DeviceQueue:
        """The named device, or the least busy one ("" = any, "cuda" = any GPU)."""
        requested = requested.strip()
        if requested and requested != "cuda" and requested in self.queues:
            return self.queues[requested]
        if requested == "cuda":
            candidates = [q for name, q in self.queues.items() if name.startswith("cuda")]
        elif requested:
            candidates = []
        else:
            candidates = list(self.queues.values())
        if not candidates:
            raise InvalidArgument(
                f"device {requested!r} is not available; this service runs on {', '.join(self.queues)}",
                metadata={"device": requested},
            )
        return min(candidates, key=lambda q: ((q.total_waiting + q.total_running) / q.concurrency, q.device == "cpu"))

    def stats(self, model: str | None = None) -> list[QueueStat]:
        out: list[QueueStat] = []
        for queue in self.queues.values():
            out.extend(stat for stat in queue.stats() if model is None or stat.model == model)
        return out

    def shutdown(self) -> None:
        for queue in self.queues.values():
            queue.shutdown()
