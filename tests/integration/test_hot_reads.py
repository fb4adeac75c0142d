"""GET /datastore/ (stats) and GET /info/ answered from what the gateway keeps (gateway.changes):
no datastore call while nothing changed, and never an answer from before a write."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import grpc
import httpx
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.contract.helpers import nifti_bytes, upload_image
from tests.fixtures.gateway import GatewayStack
from tests.fixtures.polling import wait_until
from tests.ports import free_port

NIFTI = nifti_bytes(seed=21)
LABEL = nifti_bytes(seed=22, dtype="uint8")
WAIT = 30.0  # poll-until bound; a push arrives in milliseconds


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    stack = GatewayStack(tmp_path_factory.mktemp("hot"), datastore_overrides={"metrics_port": METRICS_PORT}).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def http(stack: GatewayStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def status_calls(stack: GatewayStack) -> float:
    """GetStatus calls the datastore has started so far (its own Prometheus counter)."""
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "grpc_server_started":
            return sum(s.value for s in family.samples if s.labels.get("grpc_method") == "GetStatus")
    return 0.0


def stats(http: httpx.Client) -> dict:
    response = http.get("/datastore/")
    assert response.status_code == 200, response.text
    return response.json()


def info_stats(http: httpx.Client) -> dict:
    response = http.get("/info/")
    assert response.status_code == 200, response.text
    return response.json()["datastore"]


def upload(http: httpx.Client, image_id: str) -> None:
    response = http.put("/datastore/image", params={"image": image_id}, files={"file": ("x.nii.gz", NIFTI)})
    assert response.status_code == 200, response.text


def kept(stack: GatewayStack, http: httpx.Client) -> bool:
    """True once stats and /info/ are answered without asking the datastore (the change
    stream is open and both answers are kept)."""
    stats(http), info_stats(http)
    before = status_calls(stack)
    for _ in range(3):
        stats(http), info_stats(http)
    return status_calls(stack) == before


def test_kept_answers_ask_the_datastore_nothing(stack: GatewayStack, http: httpx.Client) -> None:
    wait_until(lambda: kept(stack, http), "stats and /info/ kept", timeout=WAIT, interval=0.01)
    before = status_calls(stack)
    answers = {json.dumps(stats(http)) for _ in range(20)}
    assert len(answers) == 1
    assert status_calls(stack) == before
    assert http.get("/datastore/", params={"output": "stats"}).json() == stats(http)


def test_writes_through_the_gateway_show_in_the_next_answer(stack: GatewayStack, http: httpx.Client) -> None:
    wait_until(lambda: kept(stack, http), "stats and /info/ kept", timeout=WAIT, interval=0.01)
    start = stats(http)
    for n in range(5):
        upload(http, f"rw{n}")
        assert stats(http)["total"] == start["total"] + 1  # no wait: the next answer
        assert info_stats(http)["total"] == start["total"] + 1
        response = http.put(
            "/datastore/label",
            params={"image": f"rw{n}", "tag": "final"},
            files={"label": ("x.nii.gz", LABEL)},
        )
        assert response.status_code == 200, response.text
        now = stats(http)
        assert now["completed"] == start["completed"] + 1
        assert now["label_tags"].get("final") == start["label_tags"].get("final", 0) + 1
        assert info_stats(http) == now
        assert http.delete("/datastore/image", params={"id": f"rw{n}"}).status_code == 200
        assert stats(http) == start
        assert info_stats(http) == start


async def _upload_direct(address: str, image_id: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await upload_image(pb_grpc.DatastoreServiceStub(channel), NIFTI, image_id=image_id)


def test_writes_elsewhere_show_once_pushed(stack: GatewayStack, http: httpx.Client) -> None:
    """A write the gateway did not make (a service, another gateway) reaches it by the push."""
    wait_until(lambda: kept(stack, http), "stats and /info/ kept", timeout=WAIT, interval=0.01)
    total = stats(http)["total"]
    asyncio.run(_upload_direct(stack.datastore_address, "elsewhere"))
    wait_until(
        lambda: stats(http)["total"] == total + 1, "stats after a write made elsewhere", timeout=WAIT, interval=0.01
    )
    wait_until(
        lambda: info_stats(http)["total"] == total + 1,
        "/info/ after a write made elsewhere",
        timeout=WAIT,
        interval=0.01,
    )
    # Kept again under the new generation.
    wait_until(lambda: kept(stack, http), "stats and /info/ kept again", timeout=WAIT, interval=0.01)
    assert stats(http)["total"] == total + 1
