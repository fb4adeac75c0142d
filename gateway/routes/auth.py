"""MONAI Label's /auth router. Public and cheap: Slicer calls GET /auth/ before every action.

With auth off MONAI Label has no such route (404); clients read any non-200 as "off", so
answering 200 with `enabled: false` is equivalent and cheaper to reason about. With auth on,
`POST /auth/token` logs a built-in user in (the users file `labelgrid users add` writes) and
answers a signed access token (services.common.auth); `GET /auth/token/valid` answers the
token's user as MONAI Label's `User.model_dump()`.
"""

from __future__ import annotations

import asyncio
import html
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import jwt
from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from gateway.auth import LOGIN_PAGE, SESSION_COOKIE, audit, bearer, cross_origin
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
    # MONAI Label's response_model Token: exactly these two fields.
    return await _login(request, username, password, "/auth/token")


class _Throttle:
    """Failed logins per (client address, username) and per address in a sliding window: past
    the limit, logins are refused with 429 until the window has passed (password guessing)."""

    WINDOW_SECONDS = 300.0
    PER_USER = 5
    PER_ADDRESS = 30

    def __init__(self) -> None:
        self._failures: dict[tuple[str, str], list[float]] = {}

    def _recent(self, key: tuple[str, str], now: float) -> list[float]:
        times = [t for t in self._failures.get(key, ()) if now - t < self.WINDOW_SECONDS]
        if times:
            self._failures[key] = times
        else:
            self._failures.pop(key, None)
        return times

    def retry_after(self, address: str, username: str) -> int | None:
        now = time.monotonic()
        for key, limit in (((address, username), self.PER_USER), ((address, ""), self.PER_ADDRESS)):
            times = self._recent(key, now)
            if len(times) >= limit:
                return max(1, int(self.WINDOW_SECONDS - (now - times[-limit])) + 1)
        return None

    def failed(self, address: str, username: str) -> None:
        now = time.monotonic()
        if len(self._failures) > 100_000:  # bounded: forget the oldest half
            self._failures = dict(list(self._failures.items())[50_000:])
        for key in ((address, username), (address, "")):
            self._failures.setdefault(key, []).append(now)


def _throttle(request: Request) -> _Throttle:
    throttle = getattr(request.app.state, "login_throttle", None)
    if throttle is None:
        throttle = request.app.state.login_throttle = _Throttle()
    return throttle


async def _login(request: Request, username: str, password: str, route: str) -> dict[str, Any]:
    """A user's access token: built-in users (argon2), or the issuer's password grant (OIDC)."""
    address = request.client.host if request.client else ""
    throttle = _throttle(request)
    wait = throttle.retry_after(address, username)
    if wait is not None:
        log.warning("login throttled", extra={"user": username[:200], "client": address})
        raise GatewayError(429, "Too many failed logins; try again later", {"Retry-After": str(wait)})
    try:
        return await _verified_login(request, username, password, route)
    except GatewayError as err:
        if err.status == 401:
            throttle.failed(address, username)
        raise


async def _verified_login(request: Request, username: str, password: str, route: str) -> dict[str, Any]:
    settings = request.app.state.settings
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
    audit(identity, "POST", route, "", 200)
    token = issue_access_token(identity, settings.auth_signing_key, settings.auth_access_ttl_seconds)
    return {"access_token": token, "token_type": "Bearer"}


# -- the browser session (OHIF) ------------------------------------------------------

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>labelgrid - sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:sans-serif;background:#111;color:#eee;display:flex;justify-content:center;padding-top:10vh}}
form{{display:flex;flex-direction:column;gap:.6em;min-width:18em}}input,button{{padding:.5em;font-size:1em}}
.error{{color:#f77}}</style></head>
<body><form method="post" action="/auth/login">
<h1>labelgrid</h1>{error}
<label>Username <input name="username" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<input type="hidden" name="next" value="{next}">
<button type="submit">Sign in</button></form></body></html>
"""
_DEFAULT_NEXT = "/ohif/"


def _safe_next(value: str | None) -> str:
    """Only a path of this server (no scheme, no `//host`, no backslash tricks): no open redirect."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")) or "\\" in value:
        return _DEFAULT_NEXT
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value) or len(value) > 2000:
        return _DEFAULT_NEXT
    return value


def _page(next_path: str, error: str | None = None, status: int = 200) -> HTMLResponse:
    note = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return HTMLResponse(
        _PAGE.format(error=note, next=html.escape(_safe_next(next_path), quote=True)),
        status_code=status,
        headers={
            "cache-control": "no-store",
            "x-frame-options": "DENY",
            "content-security-policy": "frame-ancestors 'none'",
        },
    )


def _https(request: Request) -> bool:
    """Whether the browser reached us over TLS (directly, through a proxy, or as its Origin says)."""
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return (
        request.url.scheme == "https"
        or forwarded == "https"
        or request.headers.get("origin", "").startswith("https://")
    )


@router.get("/login", summary="Sign-in page of the browser session (OHIF)", include_in_schema=False)
async def login_page(request: Request, next: str | None = None) -> Response:
    if not request.app.state.settings.auth_enabled:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _page(next or _DEFAULT_NEXT)


@router.post("/login", summary="Sign in: sets the same-origin session cookie", include_in_schema=False)
async def login(
    request: Request,
    username: Annotated[str, Form(max_length=_MAX_FIELD)],
    password: Annotated[str, Form(max_length=_MAX_FIELD)],
    next: Annotated[str | None, Form(max_length=2000)] = None,
) -> Response:
    settings = request.app.state.settings
    target = _safe_next(next)
    if not settings.auth_enabled:
        return RedirectResponse(target, status_code=303)
    origin = request.headers.get("origin")
    if origin and cross_origin(dict(request.scope.get("headers") or []), "POST", settings.public_origins) is not None:
        raise GatewayError(403, f"cross-origin sign-in from {origin[:200]}: refused (CSRF protection)")
    try:
        token = (await _login(request, username, password, "/auth/login"))["access_token"]
    except GatewayError as err:
        if err.status == 401:
            return _page(target, "Incorrect username or password", 401)
        if err.status == 429:
            return _page(target, "Too many failed sign-ins; try again later", 429)
        raise
    response = RedirectResponse(target, status_code=303)
    response.headers["cache-control"] = "no-store"
    secure = _https(request)
    response.set_cookie(
        SESSION_COOKIE, token, max_age=_lifetime(token, settings.auth_access_ttl_seconds), path="/",
        secure=secure, httponly=True, samesite="strict",
    )  # fmt: skip
    if "MONAILABEL_SERVER_URL" not in request.cookies:
        # OHIF's MONAI Label panel takes its server from this cookie (else http://<host>:8000/):
        # the gateway itself, so its calls stay same-origin and carry the session. No secret.
        own = (
            origin
            if origin and origin != "null"
            else f"{'https' if secure else 'http'}://{request.headers.get('host', '')}"
        )
        # Written as the panel's CookieUtils reads it (unescape()), not in http.cookies' quotes.
        value = quote(own.rstrip("/") + "/", safe="")
        response.headers.append(
            "set-cookie", f"MONAILABEL_SERVER_URL={value}; Path=/; SameSite=Strict" + ("; Secure" if secure else "")
        )
    return response


@router.post("/logout", summary="Sign out: clears the session cookie", include_in_schema=False)
async def logout(request: Request) -> Response:
    response = RedirectResponse(LOGIN_PAGE, status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=_https(request), httponly=True, samesite="strict")
    return response


def _lifetime(token: str, default: int) -> int:
    """Seconds until the token expires (its `exp`, as issued; checked again on every request)."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
        return max(0, int(exp - time.time())) if isinstance(exp, (int, float)) else default
    except jwt.PyJWTError:
        return default


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
    identity = await authenticator.aauthenticate(token)
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
