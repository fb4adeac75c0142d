"""The gateway's FastAPI app: MONAI Label 0.8.5's REST API over labelgrid's gRPC services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.datastructures import MutableHeaders
from starlette.types import Message, Receive, Scope, Send

from gateway import __version__
from gateway.auth import AuthMiddleware, check_auth_settings
from gateway.changes import HotReadMiddleware, stop_change_watch
from gateway.clients import GrpcClients
from gateway.errors import UnhandledErrorMiddleware, install_error_handlers
from gateway.metrics import install_metrics, route_templates
from gateway.routes import (
    activelearning,
    auth,
    batch,
    datastore,
    dicom_proxy,
    infer,
    info,
    logs,
    model,
    ohif,
    session,
    train,
    unavailable,
)
from gateway.settings import GatewaySettings

# GET (path, query string) -> the gateway.changes key its route keeps its answer under.
HOT_READS = {
    ("/datastore/", b""): datastore.STATS_KEY,
    ("/datastore/", b"output=stats"): datastore.STATS_KEY,
    ("/info/", b""): info.INFO_KEY,
}


class OriginCORSMiddleware(CORSMiddleware):
    """Starlette's CORSMiddleware, with its answer to a request without `Origin` (most calls:
    Slicer, the SDK, curl) made on the raw header list: the same `Vary: Origin` added, without
    parsing the request's headers into a `Headers` and the response's into a `MutableHeaders`.
    Requests with an `Origin` (browsers) go through Starlette's code unchanged."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, _value in scope["headers"]:
            if key == b"origin":
                await super().__call__(scope, receive, send)
                return

        async def vary_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                _vary_origin(message)
            await send(message)

        await self.app(scope, receive, vary_send)


def _vary_origin(message: Message) -> None:
    """What Starlette's CORSMiddleware does to a response when the request had no Origin."""
    headers = list(message.get("headers", ()))
    message["headers"] = headers
    for key, _value in headers:
        if key == b"vary":  # merged into the first, as Starlette does
            merged = MutableHeaders(scope=message)
            merged["Vary"] = ", ".join([*merged.getlist("Vary"), "Origin"])
            return
    headers.append((b"vary", b"Origin"))


def proxy_options(settings: GatewaySettings) -> dict[str, Any]:
    """uvicorn's options for the proxies in front: whose X-Forwarded-For/-Proto to believe."""
    return {"proxy_headers": True, "forwarded_allow_ips": ",".join(settings.forwarded_allow_ips)}


def create_app(settings: GatewaySettings) -> FastAPI:
    """One app per settings; the gRPC channels open in the lifespan and live on app.state."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.clients = GrpcClients.open(settings)
        app.state.dicom_proxy = dicom_proxy.DicomProxy(settings)
        try:
            with logs.recent_log() as app.state.recent_log:
                yield
        finally:
            await stop_change_watch(app)
            await app.state.dicom_proxy.aclose()
            await app.state.clients.close()

    app = FastAPI(
        title="MONAILabel - APIs",
        description="MONAI Label's REST API, served by labelgrid's gRPC services",
        version=__version__,
        lifespan=lifespan,
        # As MONAI Label: Swagger UI at "/", ReDoc at "/docs" (the Reviewer checks GET / is 200).
        docs_url="/",
        redoc_url="/docs",
    )
    check_auth_settings(settings)  # a users file nobody can log in with refuses to start
    app.state.settings = settings
    for router in (
        info.router,
        auth.router,
        datastore.router,
        session.router,
        infer.router,
        batch.router,
        model.router,
        train.router,
        activelearning.router,
        logs.router,
        ohif.router,
        dicom_proxy.router,
        unavailable.router,
    ):
        app.include_router(router)
    install_error_handlers(app)
    # Innermost: kept answers of the hot reads, after auth has checked the caller (gateway.changes).
    app.add_middleware(HotReadMiddleware, hot=HOT_READS)
    app.add_middleware(UnhandledErrorMiddleware)
    # Before any route reads a body: the caller's token and MONAI Label's role for the route.
    app.add_middleware(
        AuthMiddleware, settings=settings, templates=lambda: [t for _, t in route_templates(app.router.routes)]
    )
    # Outermost, so errors carry CORS headers too. With credentials allowed, Starlette echoes
    # the request's Origin instead of "*", as MONAI Label's server does.
    app.add_middleware(
        OriginCORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials=True,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    # Outermost of all: counts the status the client gets; serves GET /metrics.
    install_metrics(app)
    return app
