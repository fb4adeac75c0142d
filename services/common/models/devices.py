"""Which devices to run on: `auto` (every visible GPU, else the CPU), `cpu`, `cuda` or `cuda:N`.

Shared by inference, active learning scoring and training (each resolves its `--device`
here); inference and scoring also describe their devices with it.

CUDA_VISIBLE_DEVICES is honoured by torch itself: `cuda:0` is the first *visible* GPU.
"""

from __future__ import annotations

import os

import torch

from services.common.errors import InvalidArgument
from services.common.models.types import DeviceInfo


def resolve_devices(spec: str) -> list[str]:
    """Device names for a `--device` value (a comma list is allowed: "cuda:0,cuda:1")."""
    names: list[str] = []
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for part in [p.strip() for p in (spec or "auto").split(",") if p.strip()]:
        if part == "auto":
            names.extend([f"cuda:{i}" for i in range(gpus)] or ["cpu"])
        elif part == "cpu":
            names.append("cpu")
        elif part == "cuda":
            if not gpus:
                raise InvalidArgument("--device cuda: no GPU is visible (CUDA_VISIBLE_DEVICES, drivers)")
            names.extend(f"cuda:{i}" for i in range(gpus))
        elif part.startswith("cuda:") and part[5:].isdigit():
            if int(part[5:]) >= gpus:
                raise InvalidArgument(f"--device {part}: only {gpus} GPU(s) visible")
            names.append(part)
        else:
            raise InvalidArgument(f"--device {part!r}: use auto, cpu, cuda or cuda:N")
    return list(dict.fromkeys(names))


def _host_memory_total() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _process_rss() -> int:
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def describe_devices(names: list[str]) -> list[DeviceInfo]:
    """GPUs first, then the CPU, with total memory and what this process uses of it."""
    out: list[DeviceInfo] = []
    for name in names:
        if name.startswith("cuda"):
            index = torch.device(name).index or 0
            props = torch.cuda.get_device_properties(index)
            out.append(
                DeviceInfo(name, "cuda", props.name, int(props.total_memory), int(torch.cuda.memory_reserved(index)))
            )
    if "cpu" in names:
        out.append(DeviceInfo("cpu", "cpu", "", _host_memory_total(), _process_rss()))
    return out
