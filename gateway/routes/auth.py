"""MONAI Label's /auth router. Public and cheap: Slicer calls GET /auth/ before every action.

With auth off MONAI Label has no such route (404); clients read any non-200 as "off", so
answering 200 with `enabled: false` is equivalent and cheaper to reason about. With auth on
the gateway checks the bearer token against the configured tokens and passes it on to the
gRPC services, which check it again.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from gateway.errors import GatewayError

router = APIRouter(prefix="/auth", tags=["Auth"])

CLIENT_ID = "monai-label"
DEFAULT_USER = {
    "username": "admin",
    "email": "admin@monailabel.com",
    "name": "UNK",
    "roles": [],
}


@router.get("/", summary="Check If Auth Is Enabled")
async def auth_enabled(request: Request) -> dict[str, Any]:
    return {
        "enabled": request.app.state.settings.auth_enabled,
        "client_id": CLIENT_ID,
        "realm": "",
    }


@router.post("/token", summary="Fetch Token")
async def auth_token() -> None:
    raise GatewayError(
        501,
        "token login is not available yet in labelgrid; use a configured bearer token",
    )


@router.get("/token/valid", summary="Check If Token Is Valid")
async def token_valid(request: Request) -> dict[str, Any]:
    settings = request.app.state.settings
    if not settings.auth_enabled:
        return DEFAULT_USER
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or token not in settings.auth_tokens:
        raise GatewayError(
            401, "Could not validate credentials", {"WWW-Authenticate": "Bearer"}
        )
    return {**DEFAULT_USER, "username": "token-user"}
