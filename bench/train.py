"""Training benchmark: time per training step inside a job vs the same loop run bare in-process,
and the time from CreateTrainingJob to the job's first step.

    python -m bench.train [--epochs 4] [--out bench/results/train.json]

Starts a real datastore (sample sphere studies) and a real training service (CPU or GPU,
`--device`), runs one segmentation job, then runs the very same spec (same cached files,
params, threads) with `run_training` in this process. A step's time is measured the same
way in both: from the events the loop writes (first step to last, no validation).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from labelgrid.common.v1 import common_pb2
from labelgrid.training.v1 import resources_pb2 as res
from labelgrid.training.v1 import training_service_pb2 as pb
from labelgrid.training.v1 import training_service_pb2_grpc as pb_grpc

from services.datastore.sample_studies import write_sample_studies
from services.train.adapters.worker import run_training
from services.train.domain.events import encode
from tests.fixtures.processes import ServiceProcess


def step_seconds(events: list[dict[str, Any]]) -> tuple[float, int]:
    steps = [e for e in events if e.get("type") == "iteration"]
    first, last = steps[0], steps[-1]
    count = last["iteration"] - first["iteration"]
    return (last["ts"] - first["ts"]) / max(1, count), count


async def run_job(address: str, epochs: int, work_dir: Path) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.TrainingServiceStub(channel)
        params = res.TrainingParams(max_epochs=epochs, val_split=0.0)
        params.extra.update({"dataset": "CacheDataset", "num_samples": 2})
        started = time.time()
        job = (await stub.CreateTrainingJob(
            pb.CreateTrainingJobRequest(training_job=res.TrainingJob(trainer="trainers/segmentation", params=params))
        )).training_job  # fmt: skip
        async for message in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(name=job.name)):
            job = message.training_job
        if job.state != common_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"the job ended {job.state}: {job.error.message}\n" + "\n".join(job.log_tail))
    job_dir = work_dir / "jobs" / job.job_id
    events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
    spec = json.loads((job_dir / "spec.json").read_text())
    first_step = next(e for e in events if e["type"] == "iteration")["ts"] - started
    per_step, steps = step_seconds(events)
    return {"spec": spec, "job_step_seconds": per_step, "steps": steps, "start_to_first_step_seconds": first_step}


def bare(spec: dict[str, Any], out_dir: Path) -> float:
    torch.set_num_threads(int(spec.get("torch_threads") or torch.get_num_threads()))
    events: list[dict[str, Any]] = []
    spec = {**spec, "device": spec["devices"][0], "output_dir": str(out_dir)}
    # The events as the worker writes them to events.jsonl: {"ts", "type", fields}, what step_seconds reads.
    run_training(spec, lambda event: events.append(encode(event)))
    return step_seconds(events)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        write_sample_studies(root / "studies", count=4, labeled=4, size=64, brain=False)
        datastore = ServiceProcess(
            "services.datastore",
            "--metrics-port",
            "-1",
            "--root",
            str(root / "studies"),
            "--state-dir",
            str(root / "state"),
        )
        training = ServiceProcess(
            "services.train", "--metrics-port", "-1", "--datastore", datastore.address, "--work-dir", str(root / "train"),
            "--device", args.device, start_timeout=120,
        )  # fmt: skip
        try:
            job = asyncio.run(run_job(training.address, args.epochs, root / "train"))
        finally:
            training.stop()
            datastore.stop()
        bare_step = bare(job["spec"], root / "bare")
    result = {
        "device": job["spec"]["devices"][0],
        "epochs": args.epochs,
        "steps_timed": job["steps"],
        "job_step_seconds": job["job_step_seconds"],
        "bare_step_seconds": bare_step,
        "ratio_job_to_bare": job["job_step_seconds"] / bare_step,
        "start_to_first_step_seconds": job["start_to_first_step_seconds"],
        "cpu_count": os.cpu_count(),
    }
    print(f"{'metric':<32} {'value':>10}")
    for key in ("job_step_seconds", "bare_step_seconds", "ratio_job_to_bare", "start_to_first_step_seconds"):
        print(f"{key:<32} {result[key]:>10.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
