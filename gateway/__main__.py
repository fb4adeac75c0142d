"""Runs the gateway: `python -m gateway [--flags]` (env LABELGRID_*)."""

from __future__ import annotations

import asyncio
import sys

import uvicorn
import uvloop

from gateway.app import create_app, proxy_options
from gateway.auth import check_auth_settings
from gateway.metrics import serve_metrics
from gateway.settings import GatewaySettings
from services.common.logging import configure_logging
from services.common.memory import limit_malloc_arenas
from services.common.settings import parse_settings


async def serve(settings: GatewaySettings) -> None:
    app = create_app(settings)
    # Metrics on their own port (never the REST port); -1: off.
    metrics_note, metrics_server = "metrics off", None
    if settings.metrics_port >= 0:
        metrics_server, bound = serve_metrics(app.state.metrics, settings.metrics_host, settings.metrics_port)
        metrics_note = f"metrics on {settings.metrics_host}:{bound}"
    else:
        app.state.metrics.serve_on_app_port = False
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our structlog handler renders uvicorn's records too
        # No per-request access log here: rendering and piping a line per call cost more than
        # the hot routes themselves (Envoy writes access logs: `labelgrid up --access-log`).
        access_log=False,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.grace_seconds),
        **proxy_options(settings),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            return
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else settings.port
    print(f"gateway listening on http://{settings.host}:{port}, {metrics_note}", flush=True)
    try:
        await task
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()


def main(argv: list[str] | None = None) -> None:
    limit_malloc_arenas()
    settings = parse_settings(GatewaySettings, argv, description=__doc__.splitlines()[0])
    configure_logging(settings.log_level, settings.log_format)
    try:
        check_auth_settings(settings)
    except ValueError as err:  # fail closed, with the reason and no traceback
        sys.exit(f"gateway: {err}")
    # uvloop (libuv) instead of asyncio's selector loop: grpc.aio's channels and streams run
    # on it too (tests/integration run the gateway process this way).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings))
    sys.exit(0)


if __name__ == "__main__":
    main()
