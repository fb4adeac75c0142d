"""Inference benchmark: what the service and the gateway add on top of the bare model.

    python -m bench.infer [--sizes 96,160] [--runs 10,5] [--clients 1,2,4] [--out bench/results/infer.json]

Latency (p50 / p95, seconds) of `segmentation` on synthetic volumes of each size, through
  (a) the bare model in this process: the app's InferTask run by the inference service's own
      adapters (VolumeFiles.read -> TorchRunner.run -> VolumeFiles.write_label, same transforms,
      same label file), no gRPC, no datastore, no queue;
  (b) native gRPC: InferenceService.Infer on the inference service in its own process, the
      image fetched from a datastore process, the label streamed back;
  (c) REST: MONAI Label's POST /infer/segmentation (multipart answer, as the official client and
      Slicer get it) through Envoy (gateway/envoy.py's config) and the gateway, each in its own
      process; through the gateway directly when Envoy cannot start (the table says which).
The three run interleaved, round by round, on the same volume. Then aggregate throughput
(requests/s) of 1, 2, 4 concurrent gRPC clients through (b).
Prints a table and writes JSON. Numbers, not assertions: tests check behaviour. On a shared
2-core machine the spread is wide; the load average is recorded next to the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import hashlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import nibabel as nib
import numpy as np
import torch
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from labelgrid.inference.v1 import inference_service_pb2 as pb
from labelgrid.inference.v1 import inference_service_pb2_grpc as pb_grpc

from apps.api.prompt import Prompt
from bench.datastore import table
from services.common.apps import load_app
from services.common.models.torch_runner import TorchRunner
from services.common.models.volumes import VolumeFiles
from services.datastore.sample_studies import synthetic_volume
from tests.fixtures.processes import ServiceProcess, ServiceStartError

MODEL = "segmentation"
APP = "apps.radiology"
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])  # the sample app's 2 mm grid: no resampling cost hides in (a)
CHUNK = 1024 * 1024
GATEWAY_READY = re.compile(r"gateway listening on http://127\.0\.0\.1:(\d+)")


# -- inputs --------------------------------------------------------------------------------


def volume_file(size: int, work: Path) -> Path:
    """A gzipped NIfTI of spheres on noise, size³ float32 (what the sample app segments)."""
    image, _ = synthetic_volume(np.random.default_rng(size), size)
    path = work / f"bench_{size}.nii.gz"
    path.write_bytes(gzip.compress(nib.Nifti1Image(image, AFFINE).to_bytes(), compresslevel=1, mtime=0))
    return path


def upload(stub: ds_grpc.DatastoreServiceStub, path: Path, image_id: str) -> None:
    data = path.read_bytes()

    def requests() -> Iterator[ds_pb.UploadImageRequest]:
        yield ds_pb.UploadImageRequest(
            header=ds_pb.UploadImageHeader(image_id=image_id, file_name=path.name, size_bytes=len(data))
        )
        for start in range(0, len(data), CHUNK):
            yield ds_pb.UploadImageRequest(chunk=data[start : start + CHUNK])
        yield ds_pb.UploadImageRequest(finish=common_pb2.UploadFinish(sha256=hashlib.sha256(data).hexdigest()))

    stub.UploadImage(requests(), timeout=60)


# -- the three paths ----------------------------------------------------------------------


class BareModel:
    """(a): the service's domain adapters in-process, as one request runs them minus I/O to peers."""

    def __init__(self, work: Path) -> None:
        self.task = load_app(APP).infer_tasks[MODEL]
        self.runner = TorchRunner(["cpu"], warm_up=True)
        self.loaded = self.runner.load(self.task, "cpu", None, "")
        self.volumes = VolumeFiles()
        self.work = work
        self.model_seconds: list[float] = []

    def __call__(self, path: Path) -> None:
        volume = self.volumes.read(path, path.name)
        started = time.perf_counter()
        result = self.runner.run(self.task, self.loaded, volume, Prompt(), {}, threading.Event())
        self.model_seconds.append(time.perf_counter() - started)
        label = self.volumes.write_label(
            result.label, volume.affine, self.work, "bench_label", ".nii.gz", "float32", True
        )
        hashlib.sha256(label.read_bytes()).hexdigest()  # the service hashes every label it sends
        label.unlink()


def grpc_infer(stub: pb_grpc.InferenceServiceStub, image_id: str) -> int:
    """(b): one Infer, the label read to the end; returns its size."""
    size = 0
    request = pb.InferRequest(model=f"models/{MODEL}", image=f"images/{image_id}")
    for message in stub.Infer(request, timeout=600):
        if message.WhichOneof("payload") == "chunk":
            size += len(message.chunk)
    return size


def rest_infer(http: httpx.Client, image_id: str) -> int:
    """(c): MONAI Label's request as the official client sends it; multipart answer."""
    response = http.post(f"/infer/{MODEL}", params={"image": image_id}, data={"params": "{}"})
    response.raise_for_status()
    return len(response.content)


# -- processes -----------------------------------------------------------------------------


class GatewayProcess(ServiceProcess):
    """`python -m gateway --port 0`: the gateway prints its own ready line (an http URL)."""

    def __init__(self, *args: str, start_timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        self.metrics_port = None
        deadline = time.monotonic() + start_timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            match = GATEWAY_READY.search(line)
            if match:
                self.port = int(match[1])
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.stop()
        raise ServiceStartError("gateway did not start:\n" + "".join(self.output[-40:]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EnvoyEdge:
    """Envoy as gateway/envoy.py configures it, in front of the gateway: the REST path users get."""

    def __init__(self, work: Path, gateway: str, datastore: str, inference: str, start_timeout: float = 30.0) -> None:
        # Imported here: the edge is optional, and without it (c) goes to the gateway directly.
        from gateway import envoy

        self.port = free_port()
        settings = envoy.EnvoySettings(
            port=self.port,
            admin_port=free_port(),
            gateway_address=gateway,
            datastore_address=datastore,
            inference_address=inference,
        )
        config = envoy.write_bootstrap(settings, work / "envoy.yaml")
        self.log = work / "envoy.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(envoy.envoy_command(config), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/info/", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("envoy did not serve /info/:\n" + self.log.read_text()[-2000:])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- measuring -----------------------------------------------------------------------------


def interleaved(calls: dict[str, Callable[[], Any]], runs: int) -> dict[str, list[float]]:
    """One untimed warm-up of each (model load, lazy init), then `runs` rounds of one call of
    each, the order rotating per round: on a shared machine, load that comes and goes then
    hits every path alike instead of whichever happened to run during it."""
    for call in calls.values():
        call()
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(runs):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            started = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - started)
    return times


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def throughput(address: str, image_id: str, clients: int, per_client: int) -> dict[str, Any]:
    """`clients` threads, each with its own channel, each sending `per_client` requests back to back."""
    channels = [grpc.insecure_channel(address) for _ in range(clients)]
    stubs = [pb_grpc.InferenceServiceStub(channel) for channel in channels]
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def worker(stub: pb_grpc.InferenceServiceStub) -> None:
        start.wait()
        for _ in range(per_client):
            began = time.perf_counter()
            grpc_infer(stub, image_id)
            with lock:
                latencies.append(time.perf_counter() - began)

    threads = [threading.Thread(target=worker, args=(stub,)) for stub in stubs]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    for channel in channels:
        channel.close()
    return {
        "clients": clients,
        "requests": clients * per_client,
        "wall_s": wall,
        "requests_per_s": clients * per_client / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": p(latencies, 95),
    }


def run(sizes: list[int], runs: list[int], clients: list[int], requests: int, work: Path) -> dict[str, Any]:
    paths = {size: volume_file(size, work) for size in sizes}
    bare = BareModel(work)
    samples: dict[int, dict[str, list[float]]] = {}
    datastore = ServiceProcess(
        "services.datastore",
        "--metrics-port",
        "-1",
        "--log-level",
        "WARNING",
        "--backend",
        "local",
        "--root",
        str(work / "studies"),
        "--state-dir",
        str(work / "state"),
    )
    stops: list[Callable[[], object]] = [datastore.stop]  # run in reverse order at the end
    try:
        inference = ServiceProcess(
            "services.infer",
            "--metrics-port",
            "-1",
            "--log-level",
            "WARNING",
            "--datastore",
            datastore.address,
            "--device",
            "cpu",
            "--work-dir",
            str(work / "infer"),
        )
        stops.append(inference.stop)
        gateway = GatewayProcess(
            "--metrics-port",
            "-1",
            "--log-level",
            "WARNING",
            "--datastore-address",
            datastore.address,
            "--inference-address",
            inference.address,
        )
        stops.append(gateway.stop)
        rest_url, rest_path = f"http://127.0.0.1:{gateway.port}", "the gateway directly"
        try:
            edge = EnvoyEdge(work, f"127.0.0.1:{gateway.port}", datastore.address, inference.address)
        except Exception as error:  # noqa: BLE001 - the benchmark still measures the gateway
            rest_path = f"the gateway directly (Envoy did not start: {str(error).splitlines()[0]})"
        else:
            stops.append(edge.stop)
            rest_url, rest_path = edge.url, "Envoy -> gateway"
        print(f"  REST through {rest_path}", flush=True)
        with grpc.insecure_channel(datastore.address) as channel:
            ds_stub = ds_grpc.DatastoreServiceStub(channel)
            for size, path in paths.items():
                upload(ds_stub, path, f"bench_{size}")
        with grpc.insecure_channel(inference.address) as channel, httpx.Client(base_url=rest_url, timeout=600) as http:
            stub = pb_grpc.InferenceServiceStub(channel)
            for size, count in zip(sizes, runs, strict=True):
                bare.model_seconds.clear()
                samples[size] = interleaved(
                    {
                        "a": functools.partial(bare, paths[size]),
                        "b": functools.partial(grpc_infer, stub, f"bench_{size}"),
                        "c": functools.partial(rest_infer, http, f"bench_{size}"),
                    },
                    count,
                )
                samples[size]["a_model"] = bare.model_seconds[1:]
                print(f"  {size}³ done", flush=True)
        # The same number of requests at every level, split over its clients.
        rates = [throughput(inference.address, f"bench_{min(sizes)}", n, max(1, requests // n)) for n in clients]
    finally:
        for stop in reversed(stops):
            stop()

    latency = []
    for size, count in zip(sizes, runs, strict=True):
        s = samples[size]
        a50 = statistics.median(s["a"])
        latency.append(
            {
                "size": f"{size}^3",
                "runs": count,
                "a_p50_s": a50,
                "a_p95_s": p(s["a"], 95),
                "a_model_p50_s": statistics.median(s["a_model"]),
                "b_grpc_p50_s": statistics.median(s["b"]),
                "b_grpc_p95_s": p(s["b"], 95),
                "c_rest_p50_s": statistics.median(s["c"]),
                "c_rest_p95_s": p(s["c"], 95),
                "b/a_p50": statistics.median(s["b"]) / a50,
                "c/a_p50": statistics.median(s["c"]) / a50,
                # Per round (a, b, c ran back to back): steadier than the ratio of p50s under drifting load.
                "b/a_paired_median": statistics.median(b / a for a, b in zip(s["a"], s["b"], strict=True)),
                "c/a_paired_median": statistics.median(c / a for a, c in zip(s["a"], s["c"], strict=True)),
            }
        )
    for row in rates:
        row["image"] = f"{min(sizes)}^3"
    return {
        "rest_path": rest_path,
        "latency": latency,
        "throughput": rates,
        "samples_s": {str(k): v for k, v in samples.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="96,160", help="cube sides of the synthetic volumes")
    parser.add_argument("--runs", default="10,5", help="timed runs per size (after one warm-up)")
    parser.add_argument("--clients", default="1,2,4", help="concurrent gRPC clients for the throughput run")
    parser.add_argument(
        "--requests", type=int, default=8, help="requests per concurrency level, split over its clients"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/infer.json"))
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    runs = [int(v) for v in args.runs.split(",")]
    clients = [int(v) for v in args.clients.split(",")]
    if len(runs) != len(sizes):
        parser.error("--runs needs one count per size")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="labelgrid-bench-infer-") as tmp:
        result = run(sizes, runs, clients, args.requests, Path(tmp))
    load_after = os.getloadavg()
    rest = result["rest_path"]
    print()
    print(
        table(
            result["latency"], f"{MODEL} latency (s): (a) bare model in-process, (b) native gRPC, (c) REST via {rest}"
        )
    )
    print()
    print(
        table(
            result["throughput"],
            f"throughput through (b) native gRPC, {result['throughput'][0]['image']} (service: 1 inference at a time per device)",
        )
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1m_before": load_before[0],
            "load_avg_1m_after": load_after[0],
        },
        "model": MODEL,
        **result,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
