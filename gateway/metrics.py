"""The gateway's Prometheus metrics, served at `/metrics` on its own HTTP port.

`python -m gateway` serves them on `metrics_host:metrics_port` (a separate listener,
`serve_metrics`) and its REST port does not answer /metrics at all, so the metrics port can be
opened to Prometheus without opening the REST API; metrics_port -1 turns them off. An app made
by `create_app` alone (embedding, in-process tests) answers /metrics on itself.

A pure ASGI middleware (not BaseHTTPMiddleware, which would buffer streamed downloads and
inference results) counts every HTTP request by method, route *template* and status, times
it, and counts its body bytes in and out. The route is the template the router matched
(`/infer/{model}`, `/session/{session_id}`), never the raw path, so no image, session or
user id ever becomes a label value; a request no route matches is counted as "unmatched".

The metrics live on a dedicated `CollectorRegistry` (`app.state.metrics.registry`), never
the process-global one, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("labelgrid.gateway.metrics")

METRICS_PATH = "/metrics"
UNMATCHED_ROUTE = "unmatched"
# Anything else a client sends is "other": the method label must stay bounded.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# From fast JSON answers up to a long inference (the gateway's infer timeout is 600 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class GatewayMetrics:
    """The gateway's HTTP metrics, on the registry given (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        names = ["method", "route"]
        self.requests = Counter(
            "labelgrid_gateway_requests_total",
            "HTTP requests the gateway answered, by method, route template and status code.",
            [*names, "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "labelgrid_gateway_request_duration_seconds",
            "Seconds from receiving an HTTP request until its response was sent, by method and route template.",
            names,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "labelgrid_gateway_requests_in_flight",
            "HTTP requests the gateway is handling right now.",
            registry=self.registry,
        )
        self.received_bytes = Counter(
            "labelgrid_gateway_request_bytes_total",
            "Bytes of HTTP request bodies received, by method and route template.",
            names,
            registry=self.registry,
        )
        self.sent_bytes = Counter(
            "labelgrid_gateway_response_bytes_total",
            "Bytes of HTTP response bodies sent, by method and route template.",
            names,
            registry=self.registry,
        )

        # Whether the app's own port answers GET /metrics (off once a metrics port serves them).
        self.serve_on_app_port = True

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def serve_metrics(metrics: GatewayMetrics, host: str, port: int) -> tuple[Any, int]:
    """Serves the metrics on their own HTTP listener (prometheus_client's, in a thread) and
    stops the app port from answering /metrics. Returns the server (`shutdown()` stops it)
    and the bound port (useful with 0)."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    metrics.serve_on_app_port = False
    return server, int(server.server_address[1])


def route_templates(routes: Any) -> list[tuple[Any, str]]:
    """(path regex, template) of every route, included routers flattened, in routing order."""
    found: list[tuple[Any, str]] = []
    for route in routes or ():
        regex, path = getattr(route, "path_regex", None), getattr(route, "path", None)
        if regex is not None and isinstance(path, str):
            found.append((regex, path))
            continue
        candidates = getattr(route, "effective_candidates", None)  # FastAPI's included routers
        if callable(candidates):
            try:
                found += route_templates(candidates())
            except Exception:  # another FastAPI's internals: such requests count as unmatched
                log.warning("cannot list the routes of %r for metrics", route, exc_info=True)
        else:
            found += route_templates(getattr(route, "routes", None))
    return found


def route_template(scope: Scope, templates: list[tuple[Any, str]]) -> str:
    """The template of the route that handled (or would handle) the request; never the raw path.

    The router leaves the matched route in scope["route"]; requests answered before routing
    (CORS preflight) or by no method of a route (405) are matched by path against `templates`.
    """
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str) and path:
        return path
    raw = scope.get("path", "")
    for regex, template in templates:
        if regex.match(raw):
            return template
    return UNMATCHED_ROUTE


class MetricsMiddleware:
    """Counts and times every HTTP request, and answers GET /metrics itself.

    `routes_app` is the FastAPI app whose routes give the templates of requests answered
    before routing; `metrics` holds the instruments.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, routes_app: Any = None) -> None:
        self.app = app
        self.metrics = metrics
        self.routes_app = routes_app
        self._templates: list[tuple[Any, str]] | None = None  # built on first use: routes are all added by then
        # The labelled children, looked up once per label set: prometheus_client's labels()
        # validates and locks on every call (about half of this layer's cost on a hot read).
        # Bounded: methods and routes are (KNOWN_METHODS, route templates), statuses are the app's.
        self._counted: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._received: dict[tuple[str, str], Any] = {}
        self._sent: dict[tuple[str, str], Any] = {}

    def templates(self) -> list[tuple[Any, str]]:
        if self._templates is None:
            self._templates = route_templates(getattr(getattr(self.routes_app, "router", None), "routes", None))
        return self._templates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET").upper()
        method = method if method in KNOWN_METHODS else "other"
        metrics = self.metrics
        started = time.perf_counter()
        status = 500  # if the app fails before it starts a response, the server answers 500
        received = sent = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        metrics.in_flight.inc()
        try:
            if metrics.serve_on_app_port and scope.get("path") == METRICS_PATH and method in ("GET", "HEAD"):
                scope["route"] = _MetricsRoute
                await self._serve_metrics(method, counting_send)
            else:
                await self.app(scope, counting_receive, counting_send)
        finally:
            metrics.in_flight.dec()
            route = route_template(scope, self.templates())
            self._count(method, route, status, time.perf_counter() - started)
            if received:
                _child(self._received, metrics.received_bytes, method, route).inc(received)
            if sent:
                _child(self._sent, metrics.sent_bytes, method, route).inc(sent)

    def _count(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._counted.get(key)
        if children is None:
            metrics = self.metrics
            children = self._counted[key] = (
                metrics.requests.labels(method, route, str(status)),
                metrics.duration.labels(method, route),
            )
        children[0].inc()
        children[1].observe(seconds)

    async def _serve_metrics(self, method: str, send: Send) -> None:
        body = self.metrics.exposition()
        headers = [(b"content-type", CONTENT_TYPE_LATEST.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


def _child(cache: dict[tuple[str, str], Any], counter: Counter, method: str, route: str) -> Any:
    """`counter.labels(method, route)`, made once (a series appears only once it is counted)."""
    child = cache.get((method, route))
    if child is None:
        child = cache[method, route] = counter.labels(method, route)
    return child


class _MetricsRoute:
    """Stands for the /metrics endpoint in scope["route"] (it is served by the middleware)."""

    path = METRICS_PATH


def install_metrics(app: Any) -> GatewayMetrics:
    """Adds the metrics middleware as the outermost layer (call it after every other
    add_middleware, so the status counted is the one the client gets) and keeps the
    metrics on app.state.metrics."""
    metrics = GatewayMetrics()
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes_app=app)
    return metrics
