"""Errors in MONAI Label's shapes: `{"detail": "<message>"}` with the status its routes use.

gRPC failures map through the one shared table (`services.common.grpc_errors`), with the
few MONAI Label specifics on top (413 for too-large uploads, 429 for a busy task). Input
the gateway can judge itself is refused before any call. Anything unexpected is logged and
answered as a short JSON 500, never a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.grpc_errors import error_details

log = logging.getLogger("labelgrid.gateway")

_STATUS_FOR_REASON = {
    "PAYLOAD_TOO_LARGE": 413,
    "QUEUE_FULL": 429,
    "ALREADY_RUNNING": 429,
}


class GatewayError(Exception):
    """An answer the gateway decides itself: an HTTP status and MONAI Label's `detail`."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail
        self.headers = headers


def from_rpc_error(
    err: grpc.RpcError,
    *,
    invalid_status: int | None = None,
    service: str = "",
    address: str = "",
) -> GatewayError:
    """The HTTP answer for a failed call. `invalid_status` overrides INVALID_ARGUMENT (uploads: 422)."""
    details = error_details(err)
    status = _STATUS_FOR_REASON.get(details.reason, details.http_status)
    message = details.message or details.code.name
    if details.code is grpc.StatusCode.INVALID_ARGUMENT and invalid_status is not None:
        status = invalid_status
    if details.code is grpc.StatusCode.UNAVAILABLE and details.reason == "UNAVAILABLE" and service:
        # A transport failure, not a service's own STORAGE_ERROR: say which service is down.
        message = f"the {service} service is not reachable at {address}: {message}"
    if status >= 500 and details.code not in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ):
        log.error(
            "gRPC call failed",
            extra={
                "code": details.code.name,
                "reason": details.reason,
                "detail": message,
            },
        )
    return GatewayError(status, message)


def naming_service(service: str, address_setting: str) -> type[APIRoute]:
    """A route class whose gRPC failures name the service behind the router (its address
    is the gateway setting `address_setting`), e.g. "the training service is not reachable"."""

    class ServiceRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def named(request: Request) -> Response:
                try:
                    return await handler(request)
                except grpc.aio.AioRpcError as err:
                    address = getattr(request.app.state.settings, address_setting)
                    raise from_rpc_error(err, service=service, address=address) from None

            return named

    return ServiceRoute


def error_response(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _gateway_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    return error_response(exc.status, exc.detail, exc.headers)


async def _rpc_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, grpc.RpcError)
    err = from_rpc_error(exc)
    return error_response(err.status, err.detail)


class UnhandledErrorMiddleware:
    """Turns an unexpected exception into a logged JSON 500 without a traceback, and keeps the
    connection usable (MONAI Label's plain-text 500 dropped keep-alive connections)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception(
                "unhandled error",
                extra={"path": scope.get("path"), "method": scope.get("method")},
            )
            if started:
                raise  # the status line is out; the server can only close the connection
            response = error_response(500, "internal error in the labelgrid gateway (see its log)")
            await response(scope, receive, send)


async def _http_error(request: Request, exc: Exception) -> Any:
    """FastAPI's own answer, except for a JSON body nested too deep to parse: FastAPI says 400
    "There was an error parsing the body" (a RecursionError); that is a precise 422."""
    from fastapi.exception_handlers import http_exception_handler
    from starlette.exceptions import HTTPException

    assert isinstance(exc, HTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
        return error_response(422, "the JSON body is nested too deeply to parse")
    return await http_exception_handler(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    from starlette.exceptions import HTTPException

    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(grpc.RpcError, _rpc_error)
    app.add_exception_handler(HTTPException, _http_error)
