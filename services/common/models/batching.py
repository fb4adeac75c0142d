"""Dynamic batching: sliding-window patches of concurrent requests in one forward pass.

MONAI's sliding window calls its predictor with a batch of patches; here that predictor is a
`BatchingPredictor`, one per request, all sharing a `Batcher`. Requests of one loaded network
(model, version and device: one `LoadedNetwork` object) that run at the same time hand their
patches to a group; the first waiting thread leads: it waits until every request using that
network has handed in its patches, `max_batch_size` patches are there, or `max_queue_delay_ms`
passed, runs one forward over the concatenated patches on the network's device and hands each
request its slice of the output. No extra thread: the leader is one of the requests' threads
(inside its own `torch.inference_mode`).

A request that is cancelled stops before handing in its next patches; patches already taken by
a leader are computed and delivered as usual, so the other requests of that batch never notice.
With one request at a time nobody waits: the delay only runs while other requests of the same
network are between two patches.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self

import torch

from services.common.models.types import Cancelled


@dataclass(frozen=True)
class BatchPolicy:
    """`max_batch_size` patches per forward (1: off) and how long a leader waits for more."""

    max_batch_size: int = 1
    max_queue_delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or not 0 <= self.max_queue_delay_ms <= 10_000:
            raise ValueError("max_batch_size must be at least 1 and max_queue_delay_ms from 0 to 10000")

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1


# Measured (bench/batching.py): on CPU a batch of patches costs the sum of its patches, so
# batching only adds waiting; on a GPU one forward of 8 patches costs far less than 8 forwards.
CPU_DEFAULT = BatchPolicy(1, 0.0)
GPU_DEFAULT = BatchPolicy(8, 5.0)


class BatchPolicies:
    """The policy of a model on a device: a per-model setting, else the global one, else by device
    kind (`None` fields = decide by device)."""

    def __init__(
        self,
        max_batch_size: int | None = None,
        max_queue_delay_ms: float | None = None,
        per_model: Mapping[str, BatchPolicy] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue_delay_ms = max_queue_delay_ms
        self.per_model = dict(per_model or {})

    def policy(self, model: str, device: str) -> BatchPolicy:
        if model in self.per_model:
            return self.per_model[model]
        default = GPU_DEFAULT if device.startswith("cuda") else CPU_DEFAULT
        return BatchPolicy(
            default.max_batch_size if self.max_batch_size is None else self.max_batch_size,
            default.max_queue_delay_ms if self.max_queue_delay_ms is None else self.max_queue_delay_ms,
        )


class _Entry:
    __slots__ = ("done", "error", "inputs", "output")

    def __init__(self, inputs: torch.Tensor):
        self.inputs = inputs
        self.output: Any = None
        self.error: BaseException | None = None
        self.done = False


class _Group:
    """The requests of one loaded network."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pending: deque[_Entry] = deque()
        self.leading = False
        self.active = 0  # requests inside their sliding window now
        self.forwards = 0  # forward passes run (for tests and stats)
        self.batched = 0  # of which held patches of more than one request


def _split(output: Any, sizes: list[int]) -> list[Any]:
    """The output of one forward cut back into each entry's rows."""
    if isinstance(output, torch.Tensor):
        return list(torch.split(output, sizes, dim=0))
    if isinstance(output, (list, tuple)):
        parts = [_split(item, sizes) for item in output]
        return [type(output)(part[i] for part in parts) for i in range(len(sizes))]
    if isinstance(output, Mapping):
        by_key = {key: _split(value, sizes) for key, value in output.items()}
        return [{key: part[i] for key, part in by_key.items()} for i in range(len(sizes))]
    raise TypeError(f"cannot split a network output of type {type(output).__name__} into batches")


class Batcher:
    """The groups of every loaded network of a process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Weak: a network the model cache drops is freed, and its group with it.
        self._groups: weakref.WeakKeyDictionary[Any, _Group] = weakref.WeakKeyDictionary()

    def group(self, network: Callable[..., Any]) -> _Group:
        with self._lock:
            group = self._groups.get(network)
            if group is None:
                group = self._groups[network] = _Group()
            return group

    def predictor(
        self, network: Callable[..., Any], policy: BatchPolicy, cancelled: threading.Event
    ) -> BatchingPredictor:
        return BatchingPredictor(self, network, policy, cancelled)

    def submit(self, network: Callable[..., Any], group: _Group, inputs: torch.Tensor, policy: BatchPolicy) -> Any:
        entry = _Entry(inputs)
        delay = max(0.0, policy.max_queue_delay_ms) / 1000.0
        with group.cond:
            group.pending.append(entry)
            group.cond.notify_all()
        while True:
            with group.cond:
                while not entry.done and group.leading:
                    group.cond.wait()
                if entry.done:
                    break
                group.leading = True
                # Lead: wait for the other active requests' patches, a full batch, or the delay.
                until = time.monotonic() + delay
                while True:
                    waiting = sum(e.inputs.shape[0] for e in group.pending)
                    if waiting >= policy.max_batch_size or len(group.pending) >= group.active:
                        break
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    group.cond.wait(left)
                taken = self._take(group, policy.max_batch_size)
            try:
                self._forward(network, group, taken)
            finally:
                with group.cond:
                    group.leading = False
                    group.cond.notify_all()
        if entry.error is not None:
            raise entry.error
        return entry.output

    @staticmethod
    def _take(group: _Group, max_batch_size: int) -> list[_Entry]:
        """From the front, entries of the first one's patch shape, up to `max_batch_size` patches."""
        first = group.pending[0]
        shape, dtype, device = tuple(first.inputs.shape[1:]), first.inputs.dtype, first.inputs.device
        taken: list[_Entry] = []
        size = 0
        for entry in list(group.pending):
            x = entry.inputs
            if (tuple(x.shape[1:]), x.dtype, x.device) != (shape, dtype, device):
                continue
            if taken and size + x.shape[0] > max_batch_size:
                break
            taken.append(entry)
            size += x.shape[0]
        for entry in taken:
            group.pending.remove(entry)
        return taken

    @staticmethod
    def _forward(network: Callable[..., Any], group: _Group, taken: list[_Entry]) -> None:
        try:
            if len(taken) == 1:
                outputs = [network(taken[0].inputs)]
            else:
                sizes = [entry.inputs.shape[0] for entry in taken]
                outputs = _split(network(torch.cat([entry.inputs for entry in taken], dim=0)), sizes)
            for entry, output in zip(taken, outputs, strict=True):
                entry.output = output
        except BaseException as error:  # noqa: BLE001 - every request of the batch gets the failure
            for entry in taken:
                entry.error = error
        finally:
            with group.cond:
                group.forwards += 1
                group.batched += len(taken) > 1
                for entry in taken:
                    entry.done = True
                group.cond.notify_all()


class BatchingPredictor:
    """What one request's sliding window calls instead of the network; `with` marks it active."""

    def __init__(self, batcher: Batcher, network: Callable[..., Any], policy: BatchPolicy, cancelled: threading.Event):
        self.batcher = batcher
        self.network = network
        self.policy = policy
        self.cancelled = cancelled
        self.group = batcher.group(network)

    def __enter__(self) -> Self:
        with self.group.cond:
            self.group.active += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self.group.cond:
            self.group.active -= 1
            self.group.cond.notify_all()  # a leader may be waiting for this request's patches

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if self.cancelled.is_set():
            raise Cancelled("the inference was cancelled by its caller")
        if args or kwargs or not isinstance(inputs, torch.Tensor):
            return self.network(inputs, *args, **kwargs)
        return self.batcher.submit(self.network, self.group, inputs, self.policy)
