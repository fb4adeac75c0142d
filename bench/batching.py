"""Dynamic batching benchmark: inference throughput with 1 / 2 / 4 / 8 concurrent clients,
batching off vs on, on each device this machine has (CPU; CUDA when a GPU is visible).

    python -m bench.batching [--size 96] [--requests 16] [--clients 1,2,4,8] [--max-batch 8]
                             [--delay-ms 5] [--torch-threads 2] [--out bench/results/batching.json]

The sample app's `segmentation` task run by the inference service's own runner (TorchRunner,
the same sliding window and transforms) in this process, one thread per client as the device
pool runs them with concurrency_per_device = clients; `--requests` inferences in all per row.
Off: each request runs its own forward passes; on: TorchRunner with the shared batching
predictor (max batch, delay). Numbers, not assertions (tests check that batched == unbatched).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from apps.api.prompt import Prompt
from bench.datastore import table
from services.common.apps import load_app
from services.common.models.batching import BatchPolicies
from services.common.models.devices import resolve_devices
from services.common.models.torch_runner import TorchRunner
from services.common.models.types import Volume
from services.datastore.sample_studies import synthetic_volume

MODEL = "segmentation"
APP = "apps.radiology"


def throughput(runner: TorchRunner, task, loaded, volume: Volume, clients: int, requests: int) -> tuple[float, int]:
    """Requests per second of `clients` threads sharing `requests` inferences; forwards run."""
    left = [requests]
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client() -> None:
        barrier.wait()
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            runner.run(task, loaded, volume, Prompt(), {}, threading.Event(), model=MODEL)

    group = runner.batcher.group(loaded.network)
    forwards_before = group.forwards
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return requests / (time.perf_counter() - started), group.forwards - forwards_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results/batching.json"))
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    task = load_app(APP).infer_tasks[MODEL]
    image, _ = synthetic_volume(np.random.default_rng(args.size), args.size)
    volume = Volume(np.asarray(image, dtype=np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), "bench.nii.gz", None)
    clients = [int(c) for c in args.clients.split(",")]
    rows: list[dict] = []
    for device in resolve_devices(args.device):
        off = TorchRunner([device], warm_up=True, batching=BatchPolicies(1, 0.0))
        on = TorchRunner([device], warm_up=True, batching=BatchPolicies(args.max_batch, args.delay_ms))
        loaded = off.load(task, device, None, "")
        off.run(task, loaded, volume, Prompt(), {}, threading.Event(), model=MODEL)  # warm
        for n in clients:
            off_rate, _ = throughput(off, task, loaded, volume, n, args.requests)
            on_rate, on_forwards = throughput(on, task, loaded, volume, n, args.requests)
            rows.append(
                {
                    "device": device,
                    "clients": n,
                    "off req/s": round(off_rate, 3),
                    "on req/s": round(on_rate, 3),
                    "on / off": round(on_rate / off_rate, 3),
                    "forwards on": on_forwards,
                }
            )
            print(table(rows[-1:], ""), flush=True)
    title = (
        f"segmentation {args.size}^3, {args.requests} requests per row, max batch {args.max_batch}, "
        f"delay {args.delay_ms} ms, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}"
    )
    print(table(rows, title))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"title": title, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
