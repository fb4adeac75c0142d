"""A training request's params: the trainer's config defaults overlaid by the request, checked.

Malformed params are INVALID_ARGUMENT (INVALID_INPUT) with the key in the message, before
anything is queued.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from services.common.errors import InvalidArgument

# Typed params and the trainer config keys they stand for.
TYPED_PARAMS = (
    "max_epochs", "val_split", "learning_rate", "train_batch_size", "val_batch_size", "amp", "pretrained",
    "early_stop_patience",
)  # fmt: skip
# The contract holds these params (and progress epochs) as int32.
INT32_MAX = 2**31 - 1
# Real ranges of the params that size a run (a client's 2**31 epochs or batch of a billion is
# refused, not queued): MONAI Label's defaults are 50 epochs, batches of 1-8.
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 4096
MAX_LEARNING_RATE = 10.0


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_requested_epochs(given: dict[str, Any]) -> None:
    """A request's own max_epochs of 0 or less is refused (not replaced by the trainer's default)."""
    value = given.get("max_epochs")
    if _is_number(value) and value <= 0:
        raise InvalidArgument(f"max_epochs must be a positive number of epochs, got {value!r}")


def check_number(
    params: dict[str, Any],
    key: str,
    kind: type,
    low: float | None,
    high: float | None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """params[key] (when set) as `kind` within [low, high] (open ends as asked); INVALID_ARGUMENT otherwise."""
    if key not in params or params[key] is None:
        return
    value = params[key]
    if not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
        raise InvalidArgument(f"{key} must be a number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise InvalidArgument(f"{key} must be a whole number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise InvalidArgument(f"{key} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise InvalidArgument(f"{key} must be {'<' if high_open else '<='} {high}, got {value!r}")
    params[key] = kind(value)


def resolve_params(config: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The trainer's `config` defaults (a choice's first option) overlaid by `given`; INVALID_INPUT when malformed."""
    params: dict[str, Any] = {k: (v[0] if isinstance(v, list) and v else v) for k, v in config.items()}
    for key, value in given.items():
        if value is None:
            continue
        default = config.get(key)
        if isinstance(default, list) and default and isinstance(value, str) and value not in default:
            raise InvalidArgument(f"{key} must be one of {', '.join(map(str, default))}, got {value!r}")
        params[key] = value
    check_number(params, "max_epochs", int, 1, MAX_EPOCHS)
    check_number(params, "val_split", float, 0.0, 1.0, high_open=True)
    check_number(params, "learning_rate", float, 0.0, MAX_LEARNING_RATE, low_open=True)
    check_number(params, "train_batch_size", int, 1, MAX_BATCH_SIZE)
    check_number(params, "val_batch_size", int, 1, MAX_BATCH_SIZE)
    check_number(params, "early_stop_patience", int, -1, MAX_EPOCHS)
    if "num_samples" in config:
        check_number(params, "num_samples", int, 1, 64)
    for key in ("amp", "pretrained"):
        if key in params and not isinstance(params[key], bool):
            raise InvalidArgument(f"{key} must be true or false, got {params[key]!r}")
    return params


def split_datalist(
    datalist: list[dict[str, str]], val_split: float
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """MONAI Label's partition by val_split; with too few images to hold any out, validation
    runs on the training images (so the key metric is still measured on whole volumes)."""
    if val_split <= 0:
        return datalist, []
    val_count = int(len(datalist) * val_split)
    if val_count == 0 or val_count >= len(datalist):
        return datalist, list(datalist)
    return datalist[val_count:], datalist[:val_count]
