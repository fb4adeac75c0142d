"""`labelgrid up --infer-replicas 2`: two inference processes behind Envoy (least requests).

A real stack (tests/fixtures/labelgrid_up.py): REST infers through the edge
are spread over both replicas (each replica's own grpc_server_handled_total counts its Infers);
a new model version published through REST is served by every replica (each asked directly on
its own port); a replica killed -9 leaves inference answering through Envoy, and the supervisor
brings it back serving the same version; batch inference sends its images to both replicas.
The tests share one stack and run in file order.
The wiring itself (ports checked before start, the Envoy cluster) is checked without a stack.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import nibabel as nib
import numpy as np
import psutil
import pytest
from labelgrid.inference.v1 import inference_service_pb2 as pb
from labelgrid.inference.v1 import inference_service_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from gateway.cli import build_parser, build_stack, replica_ports
from gateway.envoy import EnvoySettings, bootstrap, routes, validate, write_bootstrap
from gateway.preflight import port_problems, stack_ports
from services.common.apps import load_app
from services.common.errors import InvalidArgument
from tests.fixtures.inference import constant_class_weights
from tests.fixtures.labelgrid_up import Stack, start_stack, stop_stack
from tests.ports import HOST, free_ports

pytestmark = pytest.mark.timeout(300)

INFER = {"image": "sample_00", "output": "json"}


@dataclass
class Replicas:
    stack: Stack
    ports: list[int]

    def metrics_port(self, n: int, after: int = 0) -> int:
        """Replica n's metrics port (random, printed when it starts): the latest one printed."""
        pattern = rf"inference-{n} \| labelgrid inference [^\n]*listening on [\d.]+:{self.ports[n - 1]}, metrics on [\d.]+:(\d+)"
        self.stack.wait_for(pattern, timeout=120, after=after)
        return int(re.findall(pattern, "".join(self.stack.output[after:]))[-1])

    def infers_served(self, n: int) -> float:
        """Infer calls replica n has answered OK, from its own Prometheus endpoint."""
        text = httpx.get(f"http://{HOST}:{self.metrics_port(n)}/metrics", timeout=10).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "grpc_server_handled_total"
            and sample.labels.get("grpc_method") == "Infer"
            and sample.labels.get("grpc_code") == "OK"
        )

    def pids(self) -> dict[int, psutil.Process]:
        """The replicas' processes by number, from their --port."""
        found = {}
        for child in psutil.Process(self.stack.proc.pid).children():
            argv = child.cmdline()
            if "services.infer" in argv and "--port" in argv:
                found[self.ports.index(int(argv[argv.index("--port") + 1])) + 1] = child
        return found


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    ports = free_ports(2)
    extra = ["--infer-replicas", "2", "--infer-replica-ports", ",".join(map(str, ports))]
    running = start_stack(tmp_path_factory.mktemp("replicas"), extra=extra, ready_timeout=240)
    yield Replicas(running, ports)
    stop_stack(running)


def rest_infer(url: str) -> httpx.Response:
    return httpx.post(f"{url}/infer/segmentation", params=INFER, timeout=120)


def direct_infer(port: int, image: str = "sample_00") -> tuple[pb.InferResultHeader, np.ndarray]:
    """One Infer on one replica's own port, past Envoy: its header and the label's voxels."""
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        header, body = None, io.BytesIO()
        request = pb.InferRequest(model="models/segmentation", image=f"images/{image}")
        for message in pb_grpc.InferenceServiceStub(channel).Infer(request, timeout=120):
            if message.WhichOneof("payload") == "header":
                header = message.header
            else:
                body.write(message.chunk)
    assert header is not None
    label = nib.Nifti1Image.from_bytes(gzip.decompress(body.getvalue()))
    return header, np.asarray(label.dataobj)


# -- without a stack -------------------------------------------------------------------------


def up_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["up", *argv])


def test_replica_ports_are_checked_before_anything_starts() -> None:
    a, b = free_ports(2)
    args = up_args("--infer-replicas", "2", "--infer-replica-ports", f"{a},{b}")
    assert replica_ports(args) == [a, b]
    assert replica_ports(up_args("--infer-replicas", "3")) == [50060, 50061, 50062]
    assert replica_ports(up_args()) == []  # one replica: on --inference-port
    with pytest.raises(InvalidArgument, match="names 1 ports for --infer-replicas 2"):
        replica_ports(up_args("--infer-replicas", "2", "--infer-replica-ports", str(a)))
    with pytest.raises(InvalidArgument, match="at least 1"):
        replica_ports(up_args("--infer-replicas", "0"))
    with pytest.raises(SystemExit):
        up_args("--infer-replica-ports", "80,http")
    # The preflight covers every replica port: one taken, one given twice.
    options = {"port": 8000, "infer_replica_ports": [a, b]}
    with socket.socket() as holder:
        holder.bind((HOST, b))
        holder.listen()
        problems = port_problems(stack_ports(options, HOST))
    assert len(problems) == 1 and f"port {b}" in problems[0] and "--infer-replica-ports" in problems[0], problems
    assert "inference replica (2 of 2)" in problems[0]
    twice = port_problems(stack_ports({"inference_port": a, "infer_replica_ports": [b, a]}, HOST))
    assert any("given twice" in line and "--infer-replica-ports" in line for line in twice), twice


def test_envoy_balances_the_replicas_by_least_requests(tmp_path: Path) -> None:
    a, b, listen = free_ports(3)
    settings = EnvoySettings(inference_address=f"{HOST}:{a},{HOST}:{b}", inference_listen_port=listen)
    config = bootstrap(settings)
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    inference = clusters["inference"]
    assert inference["lb_policy"] == "LEAST_REQUEST" and inference["health_checks"][0]["grpc_health_check"] == {}
    endpoints = inference["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [a, b]
    # Batch job RPCs go to the first healthy replica in a fixed order, where the job runs.
    jobs = clusters["inference_jobs"]["load_assignment"]["endpoints"]
    assert [
        (e["priority"], e["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"]) for e in jobs
    ] == [(0, a), (1, b)]
    first = next(r for r in routes(settings) if r.get("route", {}).get("cluster", "").startswith("inference"))
    assert (
        first["route"]["cluster"] == "inference_jobs" and "BatchInferenceJob" in first["match"]["safe_regex"]["regex"]
    )
    assert "inference_jobs" not in json.dumps(bootstrap(EnvoySettings(inference_address="lg-inference-headless:50052")))
    listeners = {listener["name"]: listener for listener in config["static_resources"]["listeners"]}
    assert listeners["inference"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": listen}
    validate(write_bootstrap(settings, tmp_path / "envoy.json"))  # Envoy itself accepts it
    # `labelgrid up` wires it so: the gateway dials Envoy's listener, each replica fans batches out to all.
    ports = free_ports(9)
    flags = ["--port", "--admin-port", "--gateway-port", "--datastore-port", "--inference-port", "--training-port",
             "--activelearning-port"]  # fmt: skip
    argv = [x for flag, port in zip(flags, ports, strict=False) for x in (flag, str(port))]
    args = up_args(
        *argv, "--work-dir", str(tmp_path), "--infer-replicas", "2", "--infer-replica-ports", f"{ports[7]},{ports[8]}"
    )
    supervisor, _ = build_stack(args, lambda line, source="": None)
    children = {child.name: child.argv for child in supervisor.children}
    assert {"inference-1", "inference-2"} <= set(children) and "inference" not in children
    gateway = children["gateway"]
    assert gateway[gateway.index("--inference-address") + 1] == f"127.0.0.1:{ports[4]}"
    for n, port in ((1, ports[7]), (2, ports[8])):
        argv_n = children[f"inference-{n}"]
        assert argv_n[argv_n.index("--port") + 1] == str(port)
        assert argv_n[argv_n.index("--batch-address") + 1] == f"ipv4:127.0.0.1:{ports[7]},127.0.0.1:{ports[8]}"


# -- a real stack ----------------------------------------------------------------------------


def test_requests_are_spread_over_both_replicas(replicas: Replicas) -> None:
    """Pairs of concurrent infers through the edge until each replica has answered some."""
    before = {n: replicas.infers_served(n) for n in (1, 2)}
    with ThreadPoolExecutor(2) as pool:
        for _ in range(10):
            answers = list(pool.map(lambda _: rest_infer(replicas.stack.url), range(2)))
            assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
            served = {n: replicas.infers_served(n) - before[n] for n in (1, 2)}
            if all(served.values()):
                break
    assert all(served.values()), f"Infers per replica: {served}"


def test_a_published_version_is_served_by_every_replica(replicas: Replicas) -> None:
    """PUT /model/segmentation (new weights): each replica, asked on its own port, soon answers
    with the same new version, and its labels come from the new weights."""
    first = {n: direct_infer(port)[0].model_version for n, port in enumerate(replicas.ports, 1)}
    assert first == {1: "", 2: ""}, first  # the untrained sample network
    answer = httpx.put(
        f"{replicas.stack.url}/model/segmentation",
        files={"file": ("model.pt", constant_class_weights(load_app("apps.radiology").infer_tasks["segmentation"], 2))},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    versions: dict[int, str] = {}
    for n, port in enumerate(replicas.ports, 1):
        for _ in range(60):  # each replica re-reads the served version every version_check_seconds
            header, label = direct_infer(port)
            if header.model_version:
                break
        versions[n] = header.model_version
        assert np.all(label == 2), f"replica {n} did not run the new weights"
    assert versions[1] == versions[2] and versions[1].startswith("models/segmentation/versions/"), versions


def test_batch_inference_fans_out_over_both_replicas(replicas: Replicas) -> None:
    """POST /batch/infer runs as a job in one replica, which sends its images to both: every
    image is one Infer answered by one of the replicas, and each answered some."""
    # More images than the job's width (4): the first four leave at once, over the channel's
    # first ready connection; the rest go round robin over both replicas.
    images = [f"sample_0{n}" for n in range(6)]
    before = {n: replicas.infers_served(n) for n in (1, 2)}
    answer = httpx.post(
        f"{replicas.stack.url}/batch/infer/segmentation",
        params={"run_sync": "true"},
        json={"images": images},
        timeout=240,
    )
    assert answer.status_code == 200, answer.text
    served = {n: replicas.infers_served(n) - before[n] for n in (1, 2)}
    assert served[1] > 0 and served[2] > 0 and served[1] + served[2] == len(images), served


def test_a_killed_replica_leaves_inference_answering(replicas: Replicas) -> None:
    """kill -9 one replica: infers through the edge keep answering 200 (Envoy retries a refused
    call on the other replica and drops the dead one at its next health check); the supervisor
    restarts it, and it serves the published version like its sibling."""
    victim = replicas.pids()[1]
    mark = len(replicas.stack.output)
    victim.kill()
    victim.wait(10)
    for _ in range(6):
        answer = rest_infer(replicas.stack.url)
        assert answer.status_code == 200, answer.text
    replicas.stack.wait_for(r"inference-1 \(pid \d+\) exited with code -9; restarting", timeout=10, after=mark)
    replicas.stack.wait_for(r"inference-1 is ready", timeout=180, after=mark)
    assert replicas.pids()[1].pid != victim.pid
    header, label = direct_infer(replicas.ports[0])
    assert header.model_version == direct_infer(replicas.ports[1])[0].model_version != ""
    assert np.all(label == 2)
