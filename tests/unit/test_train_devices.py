"""The training service's device pool: requests it can never meet are refused, the rest wait their turn."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.train.domain.devices import DevicePool, DeviceRequest


def test_gpus_are_handed_out_whole_and_in_order() -> None:
    pool = DevicePool(["cuda:0", "cuda:1"])
    assert pool.names == ["cuda:0", "cuda:1"] and pool.capacity == 2
    assert pool.try_allocate(DeviceRequest(devices=("cuda:1",))) == ["cuda:1"]
    assert pool.try_allocate(DeviceRequest(count=2)) is None  # waits until both are free
    assert pool.try_allocate(DeviceRequest(count=0)) == ["cuda:0"]  # 0 = every free GPU
    assert pool.busy() == {"cuda:0": 1, "cuda:1": 1}
    pool.release(["cuda:0", "cuda:1"])
    assert pool.try_allocate(DeviceRequest(count=2)) == ["cuda:0", "cuda:1"]


def test_bare_cuda_means_any_free_gpu() -> None:
    """MONAI Label's train request says `"device": "cuda"`; on a GPU host that is any free GPU."""
    pool = DevicePool(["cuda:0", "cuda:1"])
    pool.check(DeviceRequest(devices=("cuda",)))
    assert pool.try_allocate(DeviceRequest(devices=("cuda:0",))) == ["cuda:0"]
    assert pool.try_allocate(DeviceRequest(devices=("cuda",))) == ["cuda:1"]
    assert pool.try_allocate(DeviceRequest(devices=("cuda",))) is None  # waits for a free one
    with pytest.raises(InvalidArgument, match="'cuda'"):
        DevicePool(["cpu"]).check(DeviceRequest(devices=("cuda",)))  # no GPU here: said so


def test_cpu_slots_allow_ddp_on_the_cpu() -> None:
    pool = DevicePool(["cpu"], cpu_slots=2)
    assert pool.names == ["cpu"] and pool.totals() == {"cpu": 2}
    assert pool.try_allocate(DeviceRequest(count=0)) == ["cpu"]  # one process by default
    assert pool.try_allocate(DeviceRequest(devices=("cpu", "cpu"))) is None
    pool.release(["cpu"])
    assert pool.try_allocate(DeviceRequest(count=2)) == ["cpu", "cpu"]


@pytest.mark.parametrize(
    "request_, words",
    [
        (DeviceRequest(devices=("cuda:3",)), "cuda:3"),
        (DeviceRequest(devices=("cpu", "cpu")), "asked 2 times"),
        (DeviceRequest(count=3), "more than this host has"),
        (DeviceRequest(count=-1), "negative"),
    ],
)
def test_impossible_requests_are_refused(request_: DeviceRequest, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        DevicePool(["cpu"]).check(request_)
