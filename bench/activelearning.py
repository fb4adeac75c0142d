"""Active learning benchmark: next-sample latency as the datastore grows.

    python -m bench.activelearning [--counts 100,1000,10000] [--calls 60] [--out bench/results/activelearning.json]

The datastore and the active learning service run as their own processes (as `labelgrid up`
runs them), on both blob backends: the local folder and S3 (a real SeaweedFS), SQLite index.
For 100, 1,000 and 10,000 images (every image scored), ten annotators take turns asking for
the next sample under `random`, `first` and the score-based `epistemic` strategy; each call
picks and leases an image in the datastore (and ends the annotator's previous lease).
Prints p50 / p95 per call and writes JSON. Numbers, not assertions: tests check behaviour.
The goal is sub-linear growth: an indexed pick, not a scan per request.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from labelgrid.activelearning.v1 import activelearning_service_pb2 as al
from labelgrid.activelearning.v1 import activelearning_service_pb2_grpc as al_grpc
from labelgrid.datastore.v1 import datastore_service_pb2 as pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc

from bench.datastore import DatastoreProcess, grpc_upload, table, tiny_nifti
from tests.fixtures.processes import ServiceProcess
from tests.fixtures.seaweedfs import SeaweedS3, run_seaweedfs

STRATEGIES = ("random", "first", "epistemic")
CLIENTS = 10


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fill(stub: pb_grpc.DatastoreServiceStub, start: int, count: int) -> float:
    """Uploads images start..count-1 and scores each; returns images per second."""
    data = tiny_nifti()
    sha = hashlib.sha256(data).hexdigest()

    def one(n: int) -> None:
        image_id = f"img_{n:06d}"
        grpc_upload(stub, image_id, lambda: iter([data]), sha)
        stub.SetImageScore(
            pb.SetImageScoreRequest(
                name=f"images/{image_id}", score_key="epistemic_entropy", value=(n * 7919 % 1000) / 1000
            )
        )

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(start, count)))
    return (count - start) / (time.perf_counter() - started)


def next_sample_latency(stub: al_grpc.ActiveLearningServiceStub, strategy: str, calls: int) -> list[float]:
    times = []
    for n in range(calls):
        request = al.NextSampleRequest(strategy=f"strategies/{strategy}", client_id=f"annotator-{n % CLIENTS}")
        started = time.perf_counter()
        response = stub.NextSample(request, timeout=60)
        times.append((time.perf_counter() - started) * 1000)
        assert response.HasField("image"), response
    return times


def run_backend(backend: str, s3: SeaweedS3, counts: list[int], calls: int, work: Path) -> list[dict]:
    args = [
        "--backend",
        backend,
        "--root",
        str(work / f"studies-{backend}"),
        "--state-dir",
        str(work / f"state-{backend}"),
    ]
    if backend == "s3":
        args += ["--s3-endpoint", s3.endpoint, "--s3-access-key", s3.access_key, "--s3-secret-key", s3.secret_key,
                 "--s3-bucket", s3.new_bucket()]  # fmt: skip
    datastore = DatastoreProcess(*args)
    activelearning = None
    rows = []
    try:
        activelearning = ServiceProcess(
            "services.activelearning", "--metrics-port", "-1", "--log-level", "WARNING", "--device", "cpu",
            "--datastore", datastore.address, "--work-dir", str(work / f"al-{backend}"),
        )  # fmt: skip
        ds_channel = grpc.insecure_channel(datastore.address)
        al_channel = grpc.insecure_channel(activelearning.address)
        ds_stub, al_stub = pb_grpc.DatastoreServiceStub(ds_channel), al_grpc.ActiveLearningServiceStub(al_channel)
        have = 0
        for count in counts:
            rate = fill(ds_stub, have, count)
            have = count
            next_sample_latency(al_stub, "first", 5)  # warm the channels and the index's caches
            for strategy in STRATEGIES:
                times = next_sample_latency(al_stub, strategy, calls)
                rows.append(
                    {
                        "backend": backend,
                        "images": count,
                        "strategy": strategy,
                        "p50_ms": statistics.median(times),
                        "p95_ms": percentile(times, 0.95),
                        "fill_images_per_s": rate,
                    }
                )
                print(table(rows[-1:], ""), flush=True)
        ds_channel.close()
        al_channel.close()
    finally:
        if activelearning is not None:
            activelearning.stop()
        datastore.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="100,1000,10000", help="datastore sizes")
    parser.add_argument("--calls", type=int, default=60, help="next-sample calls per strategy and size")
    parser.add_argument("--backends", default="local,s3")
    parser.add_argument("--out", type=Path, default=Path("bench/results/activelearning.json"))
    args = parser.parse_args()
    counts = [int(v) for v in args.counts.split(",") if v]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="labelgrid-bench-al-") as tmp:
        work = Path(tmp)
        with run_seaweedfs(work / "seaweedfs") as s3:
            for backend in args.backends.split(","):
                rows += run_backend(backend, s3, counts, args.calls, work)
    print()
    print(table(rows, f"next-sample latency (ms, {args.calls} calls by {CLIENTS} annotators in turn), SQLite index"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "next_sample": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
