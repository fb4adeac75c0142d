"""`labelgrid up` as a user runs it: the whole stack as child processes behind one Envoy port.

Everything goes through Envoy: REST with the official MONAI Label client, native gRPC over
HTTP/2, and gRPC-web framed by hand (which only works if Envoy's grpc_web filter translates).
Then a child is killed -9 and must come back, and SIGTERM must leave no process behind.
The tests share one stack and run in file order.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2 as pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc
from monailabel.client import MONAILabelClient

from tests.fixtures.labelgrid_up import Stack, start_stack, stop_stack
from tests.fixtures.polling import wait_until

pytestmark = pytest.mark.timeout(240)

DATASTORE = "/labelgrid.datastore.v1.DatastoreService/"
# How long the gateway may take to reach a restarted service (its gRPC channel's reconnect backoff).
RECONNECT_S = 15.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("labelgrid-up"))
    yield running
    stop_stack(running)


def test_info_through_envoy_lists_the_models(stack: Stack) -> None:
    response = httpx.get(f"{stack.url}/info/", timeout=30)
    assert response.status_code == 200
    assert response.headers["server"] == "envoy"
    info = response.json()
    assert "segmentation" in info["models"]
    assert info["datastore"]["total"] >= 6  # the sample studies


def test_monailabel_client_round_trip_through_envoy(stack: Stack, tmp_path: Path) -> None:
    """What 3D Slicer does: info, upload, infer, save the label; the datastore shows it labeled."""
    client = MONAILabelClient(stack.url, tmpdir=str(tmp_path), client_id="tester")
    assert "segmentation" in client.info()["models"]
    image = tmp_path / "via_envoy.nii.gz"
    shutil.copy(stack.studies / "sample_05.nii.gz", image)
    assert client.upload_image(str(image), "via_envoy") == {"image": "via_envoy"}
    label, result = client.infer("segmentation", "via_envoy", {})
    assert Path(label).stat().st_size > 0
    assert result["label_names"] == {"sphere_a": 1, "sphere_b": 2}
    answer = client.save_label("via_envoy", label, params={"label_info": [{"name": "sphere_a", "idx": 1}]})
    assert answer["image"] == "via_envoy"
    objects = client.datastore()["objects"]
    assert "final" in objects["via_envoy"]["labels"]


def test_monailabel_client_trains_and_gets_next_samples_through_envoy(stack: Stack, tmp_path: Path) -> None:
    """What Slicer's training and "Next Sample" buttons do, with the official client."""
    client = MONAILabelClient(stack.url, tmpdir=str(tmp_path), client_id="radiologist-1")
    info = client.info()
    assert "segmentation" in info["trainers"] and "first" in info["strategies"]

    started = client.train_start("segmentation", {"max_epochs": 50, "val_split": 0.2})
    assert started["status"] in ("SUBMITTED", "RUNNING"), started
    assert client.train_status()["id"] == started["id"]
    stopped = client.train_stop()
    assert stopped["id"] == started["id"] and stopped["status"] == "STOPPED", stopped
    assert client.train_status(check_if_running=True) is False

    # Two annotators asking at once under "first" get two different images, each leased.
    other = MONAILabelClient(stack.url, tmpdir=str(tmp_path), client_id="radiologist-2")
    mine, theirs = client.next_sample("first", {}), other.next_sample("first", {})
    assert mine["id"] and theirs["id"] and mine["id"] != theirs["id"]

    # Working on the image (an infer carries the client's id) keeps its lease alive. REST's
    # expire_ts is whole seconds; the gRPC lease keeps the nanos, so a renewal later than the
    # hand-out shows without waiting for the second to turn.
    def lease_expiry() -> tuple[int, int]:
        with grpc.insecure_channel(f"127.0.0.1:{stack.port}") as channel:
            leases = (
                pb_grpc.DatastoreServiceStub(channel)
                .ListImageLeases(pb.ListImageLeasesRequest(client_id="radiologist-1"), timeout=10)
                .leases
            )
        [lease] = [lease for lease in leases if lease.image_id == mine["id"]]
        return lease.expire_time.seconds, lease.expire_time.nanos

    handed_out = lease_expiry()
    assert handed_out[0] == mine["lease"]["expire_ts"]
    client.infer("segmentation", mine["id"], {})
    assert lease_expiry() > handed_out


def rest_stats(stack: Stack) -> dict[str, object]:
    """MONAI Label's datastore stats over REST, to compare the gRPC answers with."""
    return httpx.get(f"{stack.url}/datastore/", params={"output": "stats"}, timeout=10).json()


def test_gateway_metrics_are_not_published_at_the_edge(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/metrics", timeout=10).status_code == 404


def test_native_grpc_through_envoy(stack: Stack) -> None:
    """HTTP/2 (h2c) on the same port as REST: Envoy routes by the service's path."""
    with grpc.insecure_channel(f"127.0.0.1:{stack.port}") as channel:
        status = pb_grpc.DatastoreServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)
    stats = rest_stats(stack)
    assert (status.total, status.completed, dict(status.label_tags)) == (
        stats["total"],
        stats["completed"],
        stats["label_tags"],
    )
    assert status.label_tags["final"] >= 3  # the sample labels and the one saved above


def grpc_web_frames(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """Splits a gRPC-web body into messages and the trailer frame (flag 0x80)."""
    messages: list[bytes] = []
    trailers: dict[str, str] = {}
    offset = 0
    while offset < len(body):
        flag, length = struct.unpack(">BI", body[offset : offset + 5])
        payload = body[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if flag & 0x80:
            for line in payload.decode().split("\r\n"):
                if line:
                    name, _, value = line.partition(":")
                    trailers[name.strip().lower()] = value.strip()
        else:
            messages.append(payload)
    return messages, trailers


def test_grpc_web_through_envoy(stack: Stack) -> None:
    """A browser's call: HTTP/1.1 POST, application/grpc-web+proto, trailers in the body, CORS."""
    origin = "http://viewer.example.org"
    request = pb.GetStatusRequest().SerializeToString()
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        preflight = http.options(
            DATASTORE + "GetStatus",
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,x-grpc-web,x-user-agent",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        assert "x-grpc-web" in preflight.headers["access-control-allow-headers"]

        response = http.post(
            DATASTORE + "GetStatus",
            content=struct.pack(">BI", 0, len(request)) + request,
            headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1", "origin": origin},
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/grpc-web")
    assert "grpc-status" in response.headers["access-control-expose-headers"]
    messages, trailers = grpc_web_frames(response.content)
    assert trailers["grpc-status"] == "0"
    status = pb.GetStatusResponse.FromString(messages[0])
    assert status.total == rest_stats(stack)["total"]

    # An error travels as grpc-status in the trailers, not as an HTTP error.
    missing = pb.GetImageRequest(name="images/no-such-image").SerializeToString()
    response = httpx.post(
        stack.url + DATASTORE + "GetImage",
        content=struct.pack(">BI", 0, len(missing)) + missing,
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
        timeout=10,
    )
    status_code = response.headers.get("grpc-status") or grpc_web_frames(response.content)[1].get("grpc-status")
    assert status_code == str(grpc.StatusCode.NOT_FOUND.value[0])


def test_a_killed_child_is_restarted(stack: Stack) -> None:
    """kill -9 inference: requests fail fast and clearly, then labelgrid up brings it back."""
    before = stack.children()["inference"]
    mark = len(stack.output)
    before.kill()
    before.wait(10)

    # Fails fast: the request's own timeout bounds the answer (no wall-clock measure).
    down = httpx.post(f"{stack.url}/infer/segmentation", params={"image": "sample_00", "output": "json"}, timeout=10)
    assert down.status_code == 503, down.text
    assert "inference" in down.json()["detail"]

    stack.wait_for(r"inference \(pid \d+\) exited with code -9; restarting", timeout=10, after=mark)
    stack.wait_for(r"inference is ready", timeout=120, after=mark)
    after = stack.children()["inference"]
    assert after.pid != before.pid

    # The gateway's channel reconnects on its own backoff: allow it a few seconds, no more.
    def answered() -> httpx.Response | None:
        response = httpx.post(
            f"{stack.url}/infer/segmentation", params={"image": "sample_00", "output": "json"}, timeout=120
        )
        return response if response.status_code != 503 else None

    again = wait_until(answered, "the gateway to reach the restarted inference", timeout=RECONNECT_S, interval=0.25)
    assert again is not None  # wait_until returns only a truthy answer
    assert again.status_code == 200, again.text
    assert again.json()["label_names"] == {"sphere_a": 1, "sphere_b": 2}


def test_sigterm_stops_every_child(stack: Stack) -> None:
    children = stack.children()
    assert set(children) == {"datastore", "inference", "training", "activelearning", "gateway", "envoy"}
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(60) == 0
    _gone, alive = psutil.wait_procs(list(children.values()), timeout=5)
    assert not alive, f"left running: {alive}"
    assert "labelgrid stopped" in stack.text()


def test_sigkill_of_labelgrid_up_leaves_no_orphan(tmp_path: Path) -> None:
    """Even a supervisor killed -9 takes its children with it (PR_SET_PDEATHSIG)."""
    running = start_stack(tmp_path)
    children = running.children()
    try:
        assert set(children) == {"datastore", "inference", "training", "activelearning", "gateway", "envoy"}
        running.proc.kill()
        running.proc.wait(10)
        # Reparented children are not ours to reap: poll until their pids are gone (or zombies).
        alive = list(children.values())

        def all_gone() -> bool:
            alive[:] = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            return not alive

        wait_until(all_gone, "every child of the killed supervisor to exit", timeout=30, interval=0.2)
    finally:
        for child in children.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
