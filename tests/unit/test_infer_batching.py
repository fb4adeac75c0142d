"""Dynamic batching: concurrent requests' sliding-window patches in one forward pass give the
same results as each request alone; a cancelled request leaves the others of its batch intact."""

from __future__ import annotations

import threading

import pytest
import torch
from monai.inferers import SlidingWindowInferer

from services.common.models.batching import (
    CPU_DEFAULT,
    GPU_DEFAULT,
    Batcher,
    BatchPolicies,
    BatchPolicy,
)
from services.common.models.types import Cancelled
from tests.fixtures.polling import eventually


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1)
    ).eval()


def _volumes(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand((1, 1, 40, 36, 28), generator=generator) for _ in range(n)]


def _run_together(batcher: Batcher, network, volumes, policy, cancel_after: dict[int, int] | None = None):
    """Each volume in its own thread, all inside their sliding window before the first patch."""
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.25)
    barrier = threading.Barrier(len(volumes))
    results: list[object] = [None] * len(volumes)

    def work(i: int) -> None:
        cancelled = threading.Event()
        calls = [0]
        predictor = batcher.predictor(network, policy, cancelled)

        def counting(x: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if cancel_after and calls[0] > cancel_after.get(i, 1 << 30):
                cancelled.set()
            return predictor(x)

        try:
            with torch.inference_mode(), predictor:
                barrier.wait()
                results[i] = inferer(volumes[i], counting)
        except Exception as error:  # noqa: BLE001 - the test looks at it
            results[i] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(volumes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive()
    return results


def test_batched_results_equal_unbatched() -> None:
    network, volumes = _network(), _volumes(4)
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.25)
    calls = [0]

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return network(x)

    with torch.inference_mode():
        alone = [inferer(v, counted) for v in volumes]
    batcher = Batcher()
    together = _run_together(batcher, network, volumes, BatchPolicy(8, 2000.0))
    group = batcher.group(network)
    assert group.batched > 0, "no forward pass held patches of two requests"
    assert group.forwards <= calls[0] // 2  # sw_batch_size 2, up to 8: 4 requests per forward
    for a, b in zip(alone, together, strict=True):
        assert isinstance(b, torch.Tensor)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        assert torch.equal(b.argmax(1), a.argmax(1))
    assert group.active == 0 and not group.pending and not group.leading


def test_cancelled_request_leaves_its_batch_intact() -> None:
    network, volumes = _network(), _volumes(3)
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.25)
    with torch.inference_mode():
        alone = [inferer(v, network) for v in volumes]
    batcher = Batcher()
    together = _run_together(batcher, network, volumes, BatchPolicy(6, 2000.0), cancel_after={1: 2})
    assert isinstance(together[1], Cancelled)
    for i in (0, 2):
        assert isinstance(together[i], torch.Tensor)
        torch.testing.assert_close(together[i], alone[i], rtol=1e-4, atol=1e-5)
    assert batcher.group(network).batched > 0


def test_a_failing_forward_fails_its_batch_only_and_the_group_recovers() -> None:
    network = _network()
    calls = [0]

    def flaky(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("out of memory")
        return network(x)

    batcher = Batcher()
    first = _run_together(batcher, flaky, _volumes(2), BatchPolicy(8, 2000.0))
    assert any(isinstance(r, RuntimeError) for r in first)
    second = _run_together(batcher, flaky, _volumes(2), BatchPolicy(8, 2000.0))
    assert all(isinstance(r, torch.Tensor) for r in second)


def test_one_request_alone_never_waits_for_the_delay() -> None:
    network, (volume,) = _network(), _volumes(1)
    batcher = Batcher()
    # A delay of 10 s per forward would make this test take minutes if a lone request waited.
    (result,) = _run_together(batcher, network, [volume], BatchPolicy(8, 10_000.0))
    assert isinstance(result, torch.Tensor)
    assert batcher.group(network).batched == 0


def test_policies_by_device_setting_and_model() -> None:
    policies = BatchPolicies()
    assert policies.policy("seg", "cpu") == CPU_DEFAULT and not CPU_DEFAULT.enabled
    assert policies.policy("seg", "cuda:0") == GPU_DEFAULT and GPU_DEFAULT.enabled
    policies = BatchPolicies(4, None, {"deepedit": BatchPolicy(2, 1.0)})
    assert policies.policy("seg", "cpu") == BatchPolicy(4, CPU_DEFAULT.max_queue_delay_ms)
    assert policies.policy("deepedit", "cuda:0") == BatchPolicy(2, 1.0)
    with pytest.raises(ValueError):
        BatchPolicy(0, 0.0)


def test_a_full_queue_refuses_before_the_fetch() -> None:
    import asyncio

    from services.common.errors import ResourceExhausted
    from services.infer.domain.scheduler import DeviceQueue

    async def scenario() -> None:
        queue = DeviceQueue("cpu", 1, 1)
        queue.check_room()  # a free slot
        release = asyncio.Event()

        async def hold() -> None:
            async with queue.slot("m"):
                await release.wait()

        first = asyncio.create_task(hold())
        second = asyncio.create_task(hold())
        await eventually(lambda: queue.total_waiting >= 1, "the second request to wait", timeout=10)
        with pytest.raises(ResourceExhausted):
            queue.check_room()
        release.set()
        await asyncio.gather(first, second)
        queue.check_room()
        queue.shutdown()

    asyncio.run(scenario())


def test_runner_with_batching_gives_the_labels_of_the_runner_without() -> None:
    """The sample app's segmentation through TorchRunner, three requests at once, batched."""
    import numpy as np

    from apps.api.prompt import Prompt
    from services.common.apps import load_app
    from services.common.models.torch_runner import TorchRunner
    from services.common.models.types import Volume

    task = load_app("apps.radiology").infer_tasks["segmentation"]
    plain = TorchRunner(["cpu"], warm_up=False)
    batched = TorchRunner(["cpu"], warm_up=False, batching=BatchPolicies(8, 2000.0))
    loaded = plain.load(task, "cpu", None, "")
    rng = np.random.default_rng(3)
    volumes = [Volume(rng.random((48, 40, 32), dtype=np.float32), np.eye(4), "v.nii.gz", None) for _ in range(3)]
    params = {"roi_size": [16, 16, 16]}
    alone = [plain.run(task, loaded, v, Prompt(), params, threading.Event()).label for v in volumes]
    together: list[object] = [None] * 3
    barrier = threading.Barrier(3)

    def work(i: int) -> None:
        barrier.wait()
        together[i] = batched.run(
            task, loaded, volumes[i], Prompt(), params, threading.Event(), model="segmentation"
        ).label

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert batched.batcher.group(loaded.network).batched > 0
    for a, b in zip(alone, together, strict=True):
        assert len(np.unique(a)) > 1  # a label worth comparing
        assert isinstance(b, np.ndarray) and np.array_equal(a, b)


def test_batching_settings_from_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.common.settings import parse_settings
    from services.infer.settings import InferSettings

    settings = parse_settings(
        InferSettings, ["--max-batch-size", "4", "--model-batching", '{"deepedit": {"max_batch_size": 2}}']
    )
    assert settings.max_batch_size == 4 and settings.max_queue_delay_ms is None
    assert settings.model_batching == {"deepedit": BatchPolicy(2, 0.0)}
    monkeypatch.setenv("LABELGRID_MODEL_BATCHING", '{"segmentation": {"max_batch_size": 8, "max_queue_delay_ms": 5}}')
    assert parse_settings(InferSettings, []).model_batching == {"segmentation": BatchPolicy(8, 5.0)}
    for bad in ('{"deepedit": {"max_batch_size": 0}}', "not json"):
        with pytest.raises(SystemExit):
            parse_settings(InferSettings, ["--model-batching", bad])
