"""schemathesis against the job routes test_openapi_fuzz.py leaves out (/train, /activelearning,
/scoring, /batch), on a stack that really runs their services: the training service (a process),
active learning and inference (in-process) over one datastore. Generated requests never get a
5xx and never a byte of the planted secret; every service still answers afterwards.

Few examples per operation keep it short: generated path params (model, strategy, method names)
are almost never real ones, so no generated request starts a long training run."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from services.datastore.sample_studies import write_sample_studies
from tests.fixtures.gateway import start_training_process
from tests.fixtures.processes import ServiceProcess
from tests.integration.conftest import GatewayStack, real_inference

pytestmark = pytest.mark.timeout(400)

JOB_ROUTES = r"^/(train|activelearning|scoring|batch)"


@dataclass
class _Servers:
    """The in-process servers the stack stops (GatewayStack stops one "inference server")."""

    servers: list[Any]

    async def stop(self, grace: float | None) -> None:
        for server in self.servers:
            await server.stop(grace)


@pytest.fixture(scope="module")
def job_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayStack, bytes]]:
    root = tmp_path_factory.mktemp("fuzz-jobs")
    secret = secrets.token_hex(32).encode()
    (root / "secret.txt").write_bytes(secret)
    write_sample_studies(root / "studies", count=2, labeled=1, size=32, brain=False)
    processes: list[ServiceProcess] = []
    stack = GatewayStack(root)
    start_inference = real_inference(root / "infer")

    async def start_services(datastore_address: str) -> tuple[str, Any]:
        training = await start_training_process(datastore_address, root / "train")
        processes.append(training)
        # A process, not in this one: the scoring jobs the fuzz starts run MC dropout in threads
        # that outlive a stopped in-process service and would draw on the test process's global
        # torch RNG while later tests check seeded results.
        activelearning = await asyncio.to_thread(
            ServiceProcess, "services.activelearning", "--metrics-port", "-1", "--datastore", datastore_address,
            "--work-dir", str(root / "al"), "--device", "cpu", "--torch-threads", "1",
            start_timeout=120,
        )  # fmt: skip
        processes.append(activelearning)
        inference_address, inference_server = await start_inference(datastore_address)
        stack.gateway_overrides.update(training_address=training.address, activelearning_address=activelearning.address)
        return inference_address, _Servers([inference_server])

    stack.start_inference = start_services
    try:
        stack.start()  # inside the try: a stack that fails to start still stops the processes
        yield stack, secret
    finally:
        stack.stop()
        for process in processes:
            process.stop()


def test_generated_job_requests_never_get_a_server_error(job_stack: tuple[GatewayStack, bytes]) -> None:
    stack, secret = job_stack
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json").include(path_regex=JOB_ROUTES)
    # An operation schemathesis cannot load is an Err: .ok() raises with its reason.
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 10, [op.label for op in operations]
    failures: list[str] = []
    calls: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=stack.url, timeout=60)
            calls.append(response.status_code)
            case.validate_response(response, checks=[not_a_server_error])
            assert secret not in response.content and secret[:16] not in response.content

        try:
            run()
        except Exception as error:  # noqa: BLE001 - collected, so every operation is tried
            failures.append(f"{operation.label}: {str(error)[:600]}")
    assert not failures, "\n".join(failures)
    assert len(calls) >= 2 * len(operations) and any(400 <= code < 500 for code in calls)
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        # Every service behind these routes still answers; nothing the fuzzer sent left a run going.
        info = http.get("/info/").json()
        assert info["trainers"] and info["scoring"] and info["strategies"], sorted(info)
        idle = http.get("/train/", params={"check_if_running": "true"})
        assert idle.status_code == 404 and "No Train Tasks are currently Running" in idle.text, idle.text
        assert http.post("/activelearning/random", json={}).status_code == 200


def test_the_stack_runs_every_job_service(job_stack: tuple[GatewayStack, bytes]) -> None:
    """The fuzz above is against live services, not closed ports (a 503 would pass as "no 5xx"
    only if it were one; this makes sure the routes reach their services)."""
    stack, _ = job_stack
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        info = http.get("/info/").json()
        assert info["trainers"] and info["scoring"] and info["strategies"], sorted(info)
        assert http.get("/train/").status_code in (200, 404)  # 404: "No Train Tasks Found"
        assert http.get("/scoring/").status_code < 500
        assert http.get("/batch/infer").status_code < 500
        answer = http.post("/activelearning/random", json={})
        assert answer.status_code == 200, answer.text[:300]
