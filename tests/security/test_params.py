"""Client params that size work get real ranges, not just "fits an int32": generated values are
accepted exactly inside the range and refused INVALID_ARGUMENT (a 422) naming the key outside."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.train.domain.params import MAX_BATCH_SIZE, MAX_EPOCHS, MAX_LEARNING_RATE, resolve_params

RANGES = {
    "max_epochs": (1, MAX_EPOCHS),
    "train_batch_size": (1, MAX_BATCH_SIZE),
    "val_batch_size": (1, MAX_BATCH_SIZE),
    "early_stop_patience": (-1, MAX_EPOCHS),
}
CONFIG = {"max_epochs": 50, "train_batch_size": 1, "val_batch_size": 1, "val_split": 0.2, "learning_rate": 1e-4}


@settings(max_examples=200, deadline=None)
@given(
    key=st.sampled_from(sorted(RANGES)),
    value=st.integers(-(2**40), 2**40) | st.sampled_from([0, 1, 4096, 4097, 100_000, 100_001]),
)
def test_training_int_params_have_real_ranges(key: str, value: int) -> None:
    low, high = RANGES[key]
    if low <= value <= high:
        assert resolve_params(CONFIG, {key: value})[key] == value
    else:
        with pytest.raises(InvalidArgument, match=key):
            resolve_params(CONFIG, {key: value})


@settings(max_examples=100, deadline=None)
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_learning_rate_and_val_split_are_bounded(value: float) -> None:
    for key, inside in (
        ("learning_rate", 0 < value <= MAX_LEARNING_RATE),
        ("val_split", 0 <= value < 1),
    ):
        if inside:
            assert resolve_params(CONFIG, {key: value})[key] == value
        else:
            with pytest.raises(InvalidArgument, match=key):
                resolve_params(CONFIG, {key: value})
