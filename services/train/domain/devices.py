"""Devices the training service hands to jobs: whole GPUs, or slots of the CPU.

A job asks for N devices (or names them); it waits in the queue until they are all free.
On a host without GPUs the CPU offers `cpu_slots` slots, all named "cpu": a job asking
for 2 gets two processes (DistributedDataParallel over gloo).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from services.common.errors import InvalidArgument


@dataclass(frozen=True)
class DeviceRequest:
    """Either exact devices (names, "cpu" repeated for several CPU processes) or a count (0 = all free)."""

    devices: tuple[str, ...] = ()
    count: int = 0


class DevicePool:
    def __init__(self, names: list[str], cpu_slots: int = 1):
        gpus = [name for name in names if name.startswith("cuda")]
        self.gpu_mode = bool(gpus)
        self.slots: list[str] = gpus if gpus else ["cpu"] * max(1, cpu_slots)
        self._busy = [False] * len(self.slots)

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(self.slots))

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def busy(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for name, busy in zip(self.slots, self._busy, strict=True):
            out[name] += int(busy)
        return {name: out[name] for name in self.names}

    def totals(self) -> dict[str, int]:
        return dict(Counter(self.slots))

    def _any_gpu(self, request: DeviceRequest) -> DeviceRequest:
        """MONAI Label's bare "cuda" means any GPU: on a GPU host, count them instead of naming one."""
        if self.gpu_mode and request.devices and all(name == "cuda" for name in request.devices):
            return DeviceRequest(count=len(request.devices))
        return request

    def check(self, request: DeviceRequest) -> None:
        """INVALID_INPUT if the host can never satisfy the request."""
        request = self._any_gpu(request)
        if request.devices:
            unknown = [d for d in request.devices if d not in self.slots]
            if unknown:
                raise InvalidArgument(
                    f"unknown device {unknown[0]!r}: this training service has {', '.join(self.names)}"
                )
            for name, wanted in Counter(request.devices).items():
                have = self.slots.count(name)
                if wanted > have:
                    raise InvalidArgument(f"device {name!r} asked {wanted} times; this training service has {have}")
            return
        if request.count < 0:
            raise InvalidArgument(f"device_count must not be negative, got {request.count}")
        if request.count > self.capacity:
            kind = "GPU(s)" if self.gpu_mode else "CPU slot(s)"
            raise InvalidArgument(f"device_count {request.count} is more than this host has ({self.capacity} {kind})")

    def try_allocate(self, request: DeviceRequest) -> list[str] | None:
        """The devices for the job, marked busy; None while they are not all free."""
        request = self._any_gpu(request)
        free = [i for i, busy in enumerate(self._busy) if not busy]
        if request.devices:
            picked: list[int] = []
            for name in request.devices:
                index = next((i for i in free if self.slots[i] == name and i not in picked), None)
                if index is None:
                    return None
                picked.append(index)
        else:
            wanted = request.count or (len(free) if self.gpu_mode else 1)
            if wanted == 0 or len(free) < wanted:
                return None
            picked = free[:wanted]
        for index in picked:
            self._busy[index] = True
        return [self.slots[i] for i in picked]

    def release(self, devices: list[str]) -> None:
        for name in devices:
            for index, slot in enumerate(self.slots):
                if slot == name and self._busy[index]:
                    self._busy[index] = False
                    break
