"""Bootstrap of one labelgrid gRPC service: server, interceptors, health, reflection, metrics.

Every service's ``__main__`` builds its settings and domain objects, then hands a
`register(server)` callback to `GrpcService`. Health turns SERVING only once the port
is bound and the server started (not before, as in Feast), and NOT_SERVING as soon as
shutdown begins, so load balancers stop sending before in-flight calls drain.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from services.common import formats
from services.common.auth import Authenticator
from services.common.interceptors import RpcInfo, ServerMetrics, TokenCheck, server_interceptors
from services.common.settings import ServiceSettings

log = logging.getLogger("labelgrid.server")

HEALTH_SERVICE_NAME = health.SERVICE_NAME  # "grpc.health.v1.Health"


def host_port(host: str, port: int) -> str:
    """`host:port`, with IPv6 literals bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class GrpcService:
    """One grpc.aio server with the shared interceptors, health, reflection and a metrics endpoint.

    `port` and `metrics_port` are the bound ports once `start` returned (useful with 0);
    `metrics_port` stays None when metrics are off (metrics_port -1). Services add their
    own metrics to `registry`.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        service_names: Sequence[str],
        register: Callable[[grpc.aio.Server], None],
        registry: CollectorRegistry | None = None,
        on_stop: Callable[[], Awaitable[Any]] | None = None,
        token_check: TokenCheck | None = None,
        on_stopping: Callable[[], None] | None = None,
    ):
        self.settings = settings
        self.service_names = list(service_names)
        self.register = register
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ServerMetrics(self.registry)
        self.on_stop = on_stop
        # Called as stopping begins, before the grace period: ends streams that never end by
        # themselves (the datastore's WatchChanges), so they do not hold shutdown for `grace`.
        self.on_stopping = on_stopping
        self.token_check = token_check
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._metrics_httpd: Any = None
        self._stopping: asyncio.Future[None] | None = None

    @property
    def address(self) -> str:
        """Where clients connect, once started."""
        return host_port(self.settings.host, self.port or 0)

    def announce_ready(self, what: str) -> None:
        """Prints the ready line every service shares, "labelgrid <what> listening on HOST:PORT,
        metrics on HOST:PORT|off", which tests/fixtures/processes.py and operators' scripts wait for."""
        metrics = f"on {self.settings.metrics_host}:{self.metrics_port}" if self.metrics_port else "off"
        print(f"labelgrid {what} listening on {self.settings.host}:{self.port}, metrics {metrics}", flush=True)

    async def start(self) -> None:
        settings = self.settings
        if self._server is not None:
            raise RuntimeError("the service is already started")
        formats.configure_limits(settings.volume_limits)
        server = grpc.aio.server(
            interceptors=server_interceptors(
                self.metrics,
                token_check=self.token_check,
                authenticator=Authenticator.from_settings(settings) if settings.auth_enabled else None,
            ),
            options=[
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                # grpc enables SO_REUSEPORT on Linux: a second process would bind the same port
                # silently and share its traffic. A taken port must fail the start instead.
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self._health = health.aio.HealthServicer()
        # The reference servicer starts with "" SERVING; nothing is ready until start() ends.
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.register(server)
        reflection.enable_server_reflection([*self.service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server)
        self._initialize_metrics()
        port = server.add_insecure_port(host_port(settings.host, settings.port))
        if port == 0:
            raise OSError(f"could not bind {host_port(settings.host, settings.port)}")
        await server.start()
        self._server, self.port = server, port
        try:
            if settings.metrics_port >= 0:
                httpd, _thread = start_http_server(
                    settings.metrics_port, addr=settings.metrics_host, registry=self.registry
                )
                self._metrics_httpd = httpd
                self.metrics_port = httpd.server_port
        except BaseException:
            await server.stop(None)
            self._server = None
            raise
        for name in [*self.service_names, ""]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "listening",
            extra={
                "host": settings.host,
                "port": self.port,
                "metrics_host": settings.metrics_host,
                "metrics_port": self.metrics_port,
                "services": self.service_names,
                "auth": bool(settings.auth_enabled or self.token_check),
            },
        )

    def _initialize_metrics(self) -> None:
        """Pre-creates the series of every method whose descriptor is loaded (generated code imported)."""
        pool = descriptor_pool.Default()
        for name in dict.fromkeys([*self.service_names, HEALTH_SERVICE_NAME]):
            try:
                service = pool.FindServiceByName(name)
            except KeyError:
                continue
            for method in service.methods:
                self.metrics.initialize(
                    RpcInfo(
                        f"/{name}/{method.name}", name, method.name, method.client_streaming, method.server_streaming
                    )
                )

    async def set_serving(self, name: str, serving: bool) -> None:
        """Marks one service (or "" for the whole server) SERVING or NOT_SERVING, e.g. while a model loads."""
        if self._health is None:
            raise RuntimeError("the service is not started")
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, then lets in-flight RPCs finish for `grace` seconds (default: settings), then cleans up.

        Safe to call twice or concurrently; the second call waits for the first.
        """
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
            return
        if self._server is None:
            return
        self._stopping = asyncio.get_running_loop().create_future()
        grace = self.settings.grace_seconds if grace is None else grace
        try:
            log.info("stopping", extra={"grace_seconds": grace, "port": self.port})
            if self.on_stopping is not None:
                self.on_stopping()
            if self._health is not None:
                # Sets everything NOT_SERVING and keeps it there.
                await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)
            if self._metrics_httpd is not None:
                httpd, self._metrics_httpd = self._metrics_httpd, None
                await asyncio.to_thread(httpd.shutdown)
                httpd.server_close()
            if self.on_stop is not None:
                await self.on_stop()
            log.info("stopped", extra={"port": self.port})
        finally:
            self._stopping.set_result(None)

    async def wait_for_termination(self) -> None:
        """Returns once the server has stopped; safe to cancel.

        grpc.aio awaits its shutdown future unshielded, so cancelling a plain
        `server.wait_for_termination()` would cancel that future and break a later stop.
        """
        if self._server is not None:
            await asyncio.shield(self._server.wait_for_termination())

    async def run_until_signal(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Serves until SIGTERM/SIGINT (or until someone else stops the server), then stops gracefully."""
        loop = asyncio.get_running_loop()
        received = asyncio.Event()
        for sig in signals:
            loop.add_signal_handler(sig, received.set)
        signal_wait = asyncio.ensure_future(received.wait())
        termination = asyncio.ensure_future(self.wait_for_termination())
        try:
            await asyncio.wait([signal_wait, termination], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            signal_wait.cancel()
            termination.cancel()
        if received.is_set():
            log.info("signal received, shutting down")
        await self.stop()
