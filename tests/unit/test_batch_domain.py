"""BatchInference's fan-out and lifecycle, with the inference use case replaced by a gate the
test opens: how many images are in flight at once, and what cancel does to them."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, ClassVar

import pytest

from services.common.errors import AlreadyExists, NotFound
from services.common.jobs import JobStore
from services.infer.domain.batch import BatchInference, BatchJob
from services.infer.domain.model import InferParams
from tests.fixtures.polling import eventually


class Records:
    """RecordStore in memory (the datastore's records API)."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], dict[str, Any]] = {}

    async def put_record(self, kind: str, record_id: str, data: dict[str, Any], expected_revision: int = 0) -> int:
        self.data[(kind, record_id)] = dict(data)
        return 1

    async def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None:
        return self.data.get((kind, record_id))

    async def list_records(self, kind: str) -> list[dict[str, Any]]:
        return [doc for (k, _), doc in self.data.items() if k == kind]


@dataclasses.dataclass
class Queue:
    concurrency: int


class Outcome:
    device, saved_label = "cpu", "images/x/labels/original"
    result_params: ClassVar[dict[str, Any]] = {"label_names": {"spleen": 1}}

    def cleanup(self) -> None:
        pass


class GatedInference:
    """Stands for Inference: every infer waits until the test opens the gate."""

    def __init__(self, slots: int) -> None:
        self.scheduler = type("S", (), {"queues": {"cpu": Queue(slots)}, "pick": lambda self, d="": None})()
        self.gate = asyncio.Event()
        self.in_flight = 0
        self.most = 0
        self.cancelled = 0
        self.params: list[InferParams] = []

    def task(self, model: str) -> None:
        if model != "seg":
            raise NotFound(f"no model {model}")

    def check_params(self, params: InferParams) -> None:
        pass

    async def infer(self, model: str, image: Any, params: InferParams, deadline: float | None = None) -> Outcome:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        self.params.append(params)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        return Outcome()


class Images:
    async def image_ids(self, image_filter: str) -> list[str]:
        return [f"img_{n:02d}" for n in range(20)]


@pytest.mark.asyncio
async def test_images_run_side_by_side_up_to_the_width_and_save_labels() -> None:
    inference = GatedInference(slots=2)
    batch = BatchInference(inference, Images(), JobStore(Records(), "batchInferenceJobs", BatchJob))  # type: ignore[arg-type]
    assert batch.width == 4  # every slot busy, one waiting behind each
    doc = await batch.create("seg", InferParams())
    await eventually(lambda: inference.in_flight == 4, "four images in flight", timeout=10)
    for _ in range(10):  # every ready task gets several turns: a fifth image would start now
        await asyncio.sleep(0)
    assert inference.most == 4  # not one by one, and never more than the width
    with pytest.raises(AlreadyExists):
        await batch.create("seg", InferParams())
    inference.gate.set()
    await eventually(lambda: batch._runner is not None and batch._runner.done(), "the job to end", timeout=10)
    done = await batch.get(doc.job_id)
    assert done.state == "SUCCEEDED" and done.processed_images == 20 and done.total_images == 20
    assert all(
        p.result.save_label and p.result.label_tag == "original" and p.result.params_only for p in inference.params
    )


@pytest.mark.asyncio
async def test_cancel_stops_the_images_in_flight_and_the_next_job_runs() -> None:
    inference = GatedInference(slots=1)
    batch = BatchInference(inference, Images(), JobStore(Records(), "batchInferenceJobs", BatchJob))  # type: ignore[arg-type]
    first = await batch.create("seg", InferParams())
    await eventually(lambda: inference.in_flight == 2, "two images in flight", timeout=10)
    second = await batch.create("seg", InferParams(), images=["img_01"], enqueue=True)
    assert (await batch.get(second.job_id)).queue_position == 1
    cancelled = await batch.cancel(first.job_id)
    assert cancelled.state == "CANCELLED" and inference.cancelled == 2
    inference.gate.set()
    await eventually(lambda: batch._runner is not None and batch._runner.done(), "the jobs to end", timeout=10)
    assert (await batch.get(second.job_id)).state == "SUCCEEDED"
    await batch.close()
