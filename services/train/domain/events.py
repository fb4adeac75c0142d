"""The events a training child reports to the service: one typed schema for both sides.

The child (`adapters/worker.py`, rank 0) writes one JSON object per line to the job's
events file with `encode`; the service tails the file and reads each line with `parse`.

    started     datasets built, first step next
    iteration   epoch, iteration, loss, ... (a few per second at most)
    epoch       MONAI Label's train_stats after every epoch, and the key metric
    checkpoint  the key metric improved: the weights were saved at `path`
    completed   the final train_stats

Plain Python (no torch): the service imports it without the training stack.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

log = logging.getLogger("labelgrid.train")


@dataclass(frozen=True)
class Started:
    TYPE: ClassVar[str] = "started"
    train_items: int = 0
    val_items: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class Iteration:
    TYPE: ClassVar[str] = "iteration"
    epoch: int = 0
    iteration: int = 0
    epoch_length: int = 0
    max_epochs: int = 0
    loss: float | None = None  # None before the first finite loss
    elapsed_seconds: float = 0.0


@dataclass(frozen=True)
class Epoch:
    TYPE: ClassVar[str] = "epoch"
    epoch: int = 0
    metric_name: str = ""
    metric: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # MONAI Label's train_stats (free-form)


@dataclass(frozen=True)
class Checkpoint:
    TYPE: ClassVar[str] = "checkpoint"
    path: str = ""
    metric_name: str = ""
    metric: float = 0.0
    epoch: int = 0


@dataclass(frozen=True)
class Completed:
    TYPE: ClassVar[str] = "completed"
    stats: dict[str, Any] = field(default_factory=dict)


Event = Started | Iteration | Epoch | Checkpoint | Completed
EVENT_TYPES: dict[str, type[Event]] = {cls.TYPE: cls for cls in (Started, Iteration, Epoch, Checkpoint, Completed)}


def encode(event: Event) -> dict[str, Any]:
    """The JSON object of one line of the events file (with the time it was written)."""
    return {"ts": time.time(), "type": event.TYPE, **asdict(event)}


def _coerce(kind: str, value: Any) -> Any:
    """One field's JSON value as its declared type (`kind` as written above); TypeError/ValueError if it is not one."""
    base = kind.removesuffix(" | None")
    if value is None:
        if base != kind:
            return None
        raise TypeError("missing value")
    if base.startswith("dict"):
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {type(value).__name__}")
        return value
    if isinstance(value, (bool, dict, list)):
        raise TypeError(f"expected a scalar, got {type(value).__name__}")
    if base == "int":
        number = float(value)
        if not math.isfinite(number):
            raise ValueError("not a finite number")
        return int(number)
    if base == "float":
        return float(value)
    return str(value)


def parse(data: Any) -> Event | None:
    """One decoded events-file line as its typed event; None (logged) for an unknown or malformed one.

    Fields the child left out take their defaults; keys the schema does not know are ignored.
    """
    if not isinstance(data, dict):
        return None
    cls = EVENT_TYPES.get(str(data.get("type")))
    if cls is None:
        log.warning("unknown training event skipped", extra={"event_type": str(data.get("type"))[:50]})
        return None
    values = {}
    try:
        for f in fields(cls):
            if f.name in data:
                values[f.name] = _coerce(str(f.type), data[f.name])
    except (TypeError, ValueError) as err:
        log.warning("malformed training event skipped", extra={"event_type": cls.TYPE, "error": str(err)})
        return None
    return cls(**values)
