"""MONAI Label's /auth router. Public and cheap: Slicer calls GET /auth/ before every action.

With auth off MONAI Label has no such route (404); clients read any non-200 as "off", so
answering 200 with `enabled: false` is equivalent and cheaper to reason about. With auth on,
`POST /auth/token` logs a built-in user in (the users file `labelgrid users add` writes) and
answers a signed access token (services.common.auth); `GET /auth/token/valid` answers the
token's user as MONAI Label's `User.model_dump()`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Form, Request

from gateway.auth import audit, bearer
from gateway.errors import GatewayError
from services.common.auth import ANONYMOUS_ADMIN, Authenticator, UsersFile, issue_access_token

router = APIRouter(prefix="/auth", tags=["Auth"])
log = logging.getLogger("labelgrid.gateway.auth")

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}
_MAX_FIELD = 1024


@router.get("/", summary="Check If Auth is Enabled")
async def auth_enabled(request: Request) -> dict[str, Any]:
    settings = request.app.state.settings
    return {
        "enabled": settings.auth_enabled,
        "client_id": settings.auth_client_id,
        "realm": settings.auth_realm or settings.auth_oidc_issuer or "",
    }


class _Users:
    """The users file, read again when it changes (a `labelgrid users add` needs no restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._users = UsersFile()

    def get(self) -> UsersFile:
        try:
            stat = os.stat(self.path)
        except OSError:
            return self._users  # gone or unreadable: keep the users it had
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            try:
                self._users = UsersFile.load(self.path)
                self._stamp = stamp
            except Exception:
                log.warning("users file %s is not valid; keeping the previous users", self.path, exc_info=True)
        return self._users


def _users(request: Request) -> UsersFile | None:
    settings = request.app.state.settings
    if settings.auth_users_file is None:
        return None
    holder = getattr(request.app.state, "auth_users", None)
    if holder is None:
        holder = request.app.state.auth_users = _Users(settings.auth_users_file)
    return holder.get()


@router.post("/token", summary="Fetch new access code/token")
async def access_token(
    request: Request,
    username: Annotated[str, Form(max_length=_MAX_FIELD)],
    password: Annotated[str, Form(max_length=_MAX_FIELD)],
    grant_type: Annotated[str | None, Form(pattern="^password$")] = None,
) -> dict[str, Any]:
    settings = request.app.state.settings
    if not settings.auth_enabled:
        return {"access_token": None, "token_type": None}
    users = _users(request)
    if users is None and settings.auth_oidc_login_url:
        return await _issuer_token(settings, username, password)
    if users is None or not settings.auth_signing_key:
        raise GatewayError(
            400, "this server has no built-in users (auth uses configured tokens); send a bearer token instead"
        )
    # argon2 is deliberately slow: off the event loop.
    identity = await asyncio.to_thread(users.verify, username, password)
    if identity is None:
        log.warning("login failed", extra={"user": username[:200]})
        raise GatewayError(401, "Incorrect username or password", _UNAUTHORIZED)
    audit(identity, "POST", "/auth/token", "", 200)
    token = issue_access_token(identity, settings.auth_signing_key, settings.auth_access_ttl_seconds)
    # MONAI Label's response_model Token: exactly these two fields.
    return {"access_token": token, "token_type": "Bearer"}


@router.get("/token/valid", summary="Check If current token is Valid")
async def valid_token(request: Request) -> dict[str, Any]:
    settings = request.app.state.settings
    if not settings.auth_enabled:
        return ANONYMOUS_ADMIN.as_user()
    token = bearer(dict(request.scope.get("headers") or []))
    if token is None:
        raise GatewayError(401, "Not authenticated", _UNAUTHORIZED)
    authenticator = getattr(request.app.state, "authenticator", None)
    if authenticator is None:
        authenticator = request.app.state.authenticator = Authenticator.from_settings(settings)
    identity = authenticator.authenticate(token)
    if identity is None:
        raise GatewayError(401, "Could not validate credentials", _UNAUTHORIZED)
    return identity.as_user()


async def _issuer_token(settings: Any, username: str, password: str) -> dict[str, Any]:
    """The password grant, passed on to the OIDC issuer (MONAI Label's /auth/token with Keycloak)."""
    data = {"client_id": settings.auth_client_id, "username": username, "password": password, "grant_type": "password"}
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.post(settings.auth_oidc_login_url, data=data)
    except httpx.HTTPError as err:
        raise GatewayError(503, f"the identity provider did not answer: {type(err).__name__}") from None
    if answer.status_code in (400, 401, 403):
        raise GatewayError(401, "Incorrect username or password", _UNAUTHORIZED)
    if answer.status_code != 200:
        raise GatewayError(502, f"the identity provider answered {answer.status_code}")
    try:
        body = answer.json()
        return {"access_token": str(body["access_token"]), "token_type": str(body.get("token_type") or "Bearer")}
    except (ValueError, KeyError, TypeError):
        raise GatewayError(502, "the identity provider's answer has no access_token") from None
