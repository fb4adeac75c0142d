"""The gateway's auth: MONAI Label's per-route roles, checked before a request body is read.

`AuthMiddleware` is a plain ASGI middleware inside CORS: it finds the route a request is for,
authenticates the bearer token (services.common.auth) and checks MONAI Label's role for the
route, all before the app reads any byte of the body, so an unauthenticated upload is refused
without being received. Answers are MONAI Label's: 401 `{"detail": "Not authenticated"}` (no
token) or `{"detail": "Could not validate credentials"}` with `WWW-Authenticate: Bearer`, and
403 `{"detail": "Role \"...\" is required to perform this action"}`.

The caller's identity goes into `request.state.identity`; the gateway forwards the caller's
own token to the gRPC services, which check the same roles per method. Mutating requests are
written to the structured audit log (logger `labelgrid.audit`) with the authenticated user.

Browsers (OHIF at /ohif/, which sends no Authorization header) use a same-origin session
instead: `POST /auth/login` sets an HttpOnly, SameSite=Strict cookie (Secure on TLS) holding
the user's short-lived access token. The cookie is accepted only on the routes OHIF calls
(`COOKIE_ROUTES`), with the same role table, and only from the gateway's own origin: a request
with a cookie and no bearer token is refused (403) when its `Origin` (or, for a change without
`Origin`, its `Referer`) is another origin, and a change with neither is refused too (CSRF).
The accepted cookie's token is then passed on as the request's bearer token, so the services
see the user, never the gateway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, quote

import grpc
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.settings import GatewaySettings
from services.common.auth import (
    ADMIN,
    ANNOTATOR,
    ANONYMOUS_ADMIN,
    USER,
    Authenticator,
    Identity,
    TokenError,
    UsersFile,
    verify_download_token,
)
from services.common.errors import InvalidArgument
from services.common.protos import dict_to_struct, struct_to_dict

audit_log = logging.getLogger("labelgrid.audit")
log = logging.getLogger("labelgrid.gateway.auth")

PUBLIC = "public"
"""Open without a token: the docs, /auth/ and the login (MONAI Label's `-`)."""
AUTHENTICATED = "authenticated"
"""Any valid token (GET /auth/token/valid checks it itself, as MONAI Label's does)."""

ROUTE_ROLES: dict[tuple[str, str], str] = {
    # Public, as in MONAI Label.
    ("GET", "/"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/auth/"): PUBLIC,
    ("POST", "/auth/token"): PUBLIC,
    ("GET", "/auth/login"): PUBLIC,  # the browser session's login page (labelgrid's, for OHIF)
    ("POST", "/auth/login"): PUBLIC,
    ("POST", "/auth/logout"): PUBLIC,
    ("GET", "/auth/token/valid"): PUBLIC,
    # monailabel-user
    ("GET", "/info/"): USER,
    ("POST", "/infer/{model}"): USER,
    ("POST", "/infer/wsi/{model}"): USER,
    ("POST", "/infer/wsi_v2/{model}"): USER,
    ("GET", "/batch/infer"): USER,
    ("GET", "/train/"): USER,
    ("POST", "/activelearning/{strategy}"): USER,
    ("GET", "/scoring/"): USER,
    ("GET", "/datastore/"): USER,
    ("HEAD", "/datastore/image"): USER,
    ("GET", "/datastore/image"): USER,
    ("GET", "/datastore/image/info"): USER,
    ("HEAD", "/datastore/label"): USER,
    ("GET", "/datastore/label"): USER,
    ("GET", "/datastore/label/info"): USER,
    ("GET", "/ohif"): USER,
    ("GET", "/ohif/{path:path}"): USER,
    ("GET", "/proxy/dicom/{op}/{path:path}"): USER,
    ("POST", "/proxy/dicom/{op}/{path:path}"): USER,
    ("GET", "/proxy/dicom/{path}"): USER,
    ("POST", "/proxy/dicom/{path}"): USER,
    ("GET", "/session/{session_id}"): USER,
    ("PUT", "/session/"): USER,
    ("DELETE", "/session/{session_id}"): USER,
    # monailabel-annotator
    ("PUT", "/model/{model}"): ANNOTATOR,
    ("DELETE", "/model/{model}"): ANNOTATOR,
    ("POST", "/scoring/"): ANNOTATOR,
    ("POST", "/scoring/{method}"): ANNOTATOR,
    ("DELETE", "/scoring/"): ANNOTATOR,
    ("PUT", "/datastore/image"): ANNOTATOR,
    ("PUT", "/datastore/"): ANNOTATOR,
    ("PUT", "/datastore/image/info"): ANNOTATOR,
    ("PUT", "/datastore/label"): ANNOTATOR,
    ("PUT", "/datastore/label/info"): ANNOTATOR,
    ("PUT", "/datastore/updatelabelinfo"): ANNOTATOR,
    ("GET", "/datastore/dataset"): ANNOTATOR,
    # monailabel-admin
    ("GET", "/model/{model}"): ADMIN,
    ("GET", "/model/info/{model}"): ADMIN,
    ("POST", "/batch/infer/{model}"): ADMIN,
    ("DELETE", "/batch/infer"): ADMIN,
    ("POST", "/train/"): ADMIN,
    ("POST", "/train/{model}"): ADMIN,
    ("DELETE", "/train/"): ADMIN,
    ("DELETE", "/datastore/image"): ADMIN,
    ("DELETE", "/datastore/"): ADMIN,
    ("DELETE", "/datastore/label"): ADMIN,
    ("GET", "/logs/"): ADMIN,
    ("GET", "/logs/gpu"): ADMIN,
    ("POST", "/reload"): ADMIN,  # public in MONAI Label, which reloads the app there
}
"""MONAI Label 0.8.5's role per route (monailabel-api-routes.md §2, `RBAC(...)` in its endpoints).
A route of the app missing here needs the admin role (tests/integration/test_auth.py lists them)."""

DOWNLOAD_ROUTE = "/datastore/image"
"""Takes a signed `?token=` instead of a bearer token (Slicer's download sends no header)."""


GRANT_KIND = "download-grants"
"""Datastore record kind of the Slicer download grants (`records/download-grants/<sha256>`)."""


def grant_record_id(image_id: str, address: str) -> str:
    """The grant's record id: a hash of (image, client address), so neither shows in a listing
    and any id or address fits the datastore's record id rule."""
    return hashlib.sha256(f"{image_id}\0{address}".encode()).hexdigest()


class DownloadGrants:
    """One tokenless download of one image, for the address that was just handed it as the next
    sample (stock Slicer: its SampleData download is a bare `urllib` GET of
    `{server}/datastore/image?image=ID`, no header, no token, whatever the answer's `path` says).

    A grant is for that image, that client address (the caller as uvicorn sees it: Envoy's
    X-Forwarded-For from a trusted loopback proxy), used once, within the download TTL, and
    recorded under the user who asked. Grants are datastore records (`GRANT_KIND`, written and
    read with the gateway's service identity), so any gateway replica honours a grant another
    issued. Taking one is a conditional write (the record's revision) that marks it used, so
    of two replicas taking it at once only one wins; the used record is then deleted. Expired
    grants nobody took are swept at most once per TTL per process. There is no in-process fast
    path: a local copy could be used again on another replica."""

    def __init__(self, datastore: Any, timeout: float) -> None:
        self._datastore = datastore
        self._timeout = timeout
        self._next_sweep = 0.0

    async def grant(
        self, image_id: str, address: str, username: str, ttl_seconds: float, metadata: tuple[tuple[str, str], ...]
    ) -> None:
        """Stores (or renews) the grant; a datastore failure is logged (the signed link still works)."""
        data = {"image": image_id, "address": address, "user": username, "expires": time.time() + ttl_seconds}
        try:
            await self._datastore.PutRecord(
                ds_pb.PutRecordRequest(name=_grant_name(image_id, address), data=dict_to_struct(data)),
                timeout=self._timeout,
                metadata=metadata,
            )
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + ttl_seconds
                await self._sweep(metadata)
        except grpc.aio.AioRpcError as err:
            log.warning("download grant for %r not stored: %s %s", image_id[:200], err.code().name, err.details())

    async def take(self, image_id: str, address: str, metadata: tuple[tuple[str, str], ...]) -> str | None:
        """The user the grant was for, once; None if there is none (or it expired, or another
        replica took it first)."""
        name = _grant_name(image_id, address)
        try:
            found = await self._datastore.GetRecord(
                ds_pb.GetRecordRequest(name=name), timeout=self._timeout, metadata=metadata
            )
            data = struct_to_dict(found.record.data)
            if data.get("used") or data.get("image") != image_id or data.get("address") != address:
                return None
            if float(data.get("expires", 0)) <= time.time():
                await self._delete(name, metadata, found.record.revision)
                return None
            used = await self._datastore.PutRecord(  # ABORTED when another replica took it meanwhile
                ds_pb.PutRecordRequest(
                    name=name, data=dict_to_struct({**data, "used": True}), expected_revision=found.record.revision
                ),
                timeout=self._timeout,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED):
                log.warning("download grant for %r not read: %s %s", image_id[:200], err.code().name, err.details())
            return None
        # Only the revision this take marked used: a grant another replica issued again since
        # (a new next-sample answer for the same image and address) is a new revision and stays.
        await self._delete(name, metadata, used.record.revision)
        return str(data.get("user") or "") or None

    async def _delete(self, name: str, metadata: tuple[tuple[str, str], ...], revision: int = 0) -> None:
        """Deletes the grant; with `revision`, only while it is still that revision (ABORTED, and
        kept, when it was written again meanwhile)."""
        try:
            await self._datastore.DeleteRecord(
                ds_pb.DeleteRecordRequest(name=name, expected_revision=revision),
                timeout=self._timeout,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED):
                log.warning("download grant %s not deleted: %s %s", name, err.code().name, err.details())

    async def _sweep(self, metadata: tuple[tuple[str, str], ...]) -> None:
        """Deletes grants that expired (or were used) and are still stored."""
        token, now = "", time.time()
        while True:
            page = await self._datastore.ListRecords(
                ds_pb.ListRecordsRequest(parent=f"records/{GRANT_KIND}", page_size=1000, page_token=token),
                timeout=self._timeout,
                metadata=metadata,
            )
            for record in page.records:
                data = struct_to_dict(record.data)
                if data.get("used") or float(data.get("expires", 0)) <= now:
                    await self._delete(record.name, metadata, record.revision)
            token = page.next_page_token
            if not token:
                return


def _grant_name(image_id: str, address: str) -> str:
    return f"records/{GRANT_KIND}/{grant_record_id(image_id, address)}"


def download_grants(app: Any) -> DownloadGrants:
    """The app's grants (one per app, made on first use, over the app's datastore stub)."""
    grants = getattr(app.state, "download_grants", None)
    if grants is None:
        grants = app.state.download_grants = DownloadGrants(
            app.state.clients.datastore, app.state.settings.rpc_timeout_seconds
        )
    return grants


def service_metadata(settings: GatewaySettings) -> tuple[tuple[str, str], ...]:
    """The gateway's own identity for the grant records (empty with no service token)."""
    token = settings.service_token
    return (("authorization", f"Bearer {token}"),) if token else ()


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


SESSION_COOKIE = "labelgrid_session"
"""The browser session's cookie (POST /auth/login sets it): the user's access token."""

COOKIE_ROUTES: frozenset[tuple[str, str]] = frozenset({
    ("GET", "/ohif"),
    ("GET", "/ohif/{path:path}"),
    ("GET", "/proxy/dicom/{op}/{path:path}"),
    ("POST", "/proxy/dicom/{op}/{path:path}"),  # STOW and reject, which OHIF's config turns on
    ("GET", "/proxy/dicom/{path}"),
    ("POST", "/proxy/dicom/{path}"),
    ("GET", "/info/"),
    ("POST", "/infer/{model}"),
    ("POST", "/activelearning/{strategy}"),
    ("GET", "/train/"),
    ("POST", "/train/"),
    ("DELETE", "/train/"),
    ("GET", "/logs/"),
    ("GET", "/datastore/"),
    ("GET", "/datastore/image"),
    ("GET", "/datastore/image/info"),
    ("GET", "/datastore/label"),
    ("GET", "/datastore/label/info"),
    ("PUT", "/datastore/label"),
})  # fmt: skip
"""What OHIF's MONAI Label panel and viewer call (monailabel-compat review §2): the only routes a
session cookie opens. HEAD goes with GET. Everything else needs a bearer token."""

LOGIN_PAGE = "/auth/login"

_AUDITED_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})


def _compile(template: str) -> re.Pattern[str]:
    pattern = ""
    for part in re.split(r"(\{[^}]+\})", template):
        if part.startswith("{"):
            pattern += ".*" if part.endswith(":path}") else "[^/]+"
        else:
            pattern += re.escape(part)
    return re.compile(f"^{pattern}$")


def check_auth_settings(settings: GatewaySettings) -> None:
    """Refuses to start with a users file that cannot log anyone in (fail closed, never open)."""
    if settings.auth_users_file is None:
        return
    if not settings.auth_signing_key:
        raise ValueError("auth_users_file needs auth_signing_key (the key access tokens are signed with)")
    try:
        users = UsersFile.load(settings.auth_users_file).users
    except InvalidArgument as err:
        raise ValueError(err.message) from None
    if not users:
        raise ValueError(f"users file {str(settings.auth_users_file)!r} has no users: refusing to start")


def route_table(app_templates: list[str]) -> list[tuple[re.Pattern[str], str]]:
    """(regex, template) for the app's routes, in routing order, deduplicated."""
    return [(_compile(template), template) for template in dict.fromkeys(app_templates)]


def required_role(method: str, template: str) -> str:
    role = ROUTE_ROLES.get((method, template))
    if role is None and method == "HEAD":
        role = ROUTE_ROLES.get(("GET", template))
    return role if role is not None else ADMIN


def cookie(scope: Scope, name: str = SESSION_COOKIE) -> str | None:
    """The value of cookie `name` (every `cookie` header: HTTP/2 may send several), if set."""
    for key, value in scope.get("headers") or ():
        if key != b"cookie":
            continue
        for pair in value.decode("latin-1").split(";"):
            key_name, sep, found = pair.strip().partition("=")
            if sep and key_name == name and found.strip():
                return found.strip().strip('"')
    return None


def _origin_of(url: str) -> str | None:
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme or not rest:
        return None
    return rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0].lower() or None


def _scheme_and_origin(url: str) -> str | None:
    """scheme://host[:port] of a URL, lower case (the scheme counts: http is not https's origin)."""
    host = _origin_of(url.strip())
    return f"{url.strip().partition('://')[0].lower()}://{host}" if host else None


def cross_origin(headers: dict[bytes, bytes], method: str, public_origins: Iterable[str] = ()) -> str | None:
    """Why a cookie-authenticated request is not from the gateway's own origin, or None.

    The gateway's own origin is each of `public_origins` (scheme://host[:port], set when a proxy
    in front rewrites Host) or else the request's Host (as the browser addressed us); Origin
    (sent by browsers on every cross-origin request and every change) must name it. A change
    without Origin needs a Referer of the same origin; a read without either is a top-level
    navigation or a same-origin fetch, which SameSite=Strict already limits to us."""
    own = {origin for origin in map(_scheme_and_origin, public_origins) if origin}
    host = headers.get(b"host", b"").decode("latin-1").strip().lower()

    def matches(url: str) -> bool:
        if public_origins:  # a malformed URL (no origin) never matches, nor does Host then
            origin = _scheme_and_origin(url)
            return origin is not None and origin in own
        return _origin_of(url) == host

    origin = headers.get(b"origin", b"").decode("latin-1").strip()
    if origin:
        return None if origin != "null" and matches(origin) else f"cross-origin request from {origin[:200]}"
    if method in ("GET", "HEAD"):
        return None
    referer = headers.get(b"referer", b"").decode("latin-1").strip()
    if not referer:
        return "a change with a session cookie needs an Origin or Referer header"
    return None if matches(referer) else "cross-origin request (Referer)"


def bearer(headers: dict[bytes, bytes]) -> str | None:
    value = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """Authenticates and authorizes every HTTP request before the app (and its body parsing)."""

    def __init__(self, app: ASGIApp, settings: GatewaySettings, templates: Any) -> None:
        self.app = app
        self.settings = settings
        self.enabled = settings.auth_enabled
        self.authenticator = Authenticator.from_settings(settings) if self.enabled else None
        self._templates_source = templates
        self._routes: list[tuple[re.Pattern[str], str]] | None = None
        # Paths whose route has no parameter ({path: template}): such a template matches one
        # path only, so this holds at most one entry per such route, and a hot read (/info/,
        # /datastore/) skips the scan of every route's regex.
        self._fixed: dict[str, str] = {}

    def _match(self, path: str) -> str | None:
        found = self._fixed.get(path)
        if found is not None:
            return found
        if self._routes is None:
            self._routes = route_table(self._templates_source())
        for regex, template in self._routes:
            if regex.match(path):
                if "{" not in template:
                    self._fixed[path] = template
                return template
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if not self.enabled:
            state["identity"] = ANONYMOUS_ADMIN
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET").upper()
        path = scope.get("path", "")
        template = self._match(path)
        # A path no route has: any valid token gets the router's 404 / redirect.
        role = required_role(method, template) if template is not None else None
        if role == PUBLIC or method == "OPTIONS":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        identity = await self._identify(headers, scope, template)
        if identity is None and bearer(headers) is None and _cookie_route(method, template):
            identity = await self._session(scope)
            if identity is not None:
                why = cross_origin(headers, method, self.settings.public_origins)
                if why is not None:
                    log.warning("session cookie refused: %s", why, extra={"user": identity.username, "route": template})
                    await _answer(send, 403, f"{why}: refused (CSRF protection)")
                    return
        if identity is None:
            wants_page = b"text/html" in headers.get(b"accept", b"") and bearer(headers) is None
            if method == "GET" and template in ("/ohif", "/ohif/{path:path}") and wants_page and self._login_page:
                # A browser opening OHIF without a session: to the login page, and back after.
                query = scope.get("query_string", b"").decode("latin-1")
                back = quote(path + (f"?{query}" if query else ""), safe="")
                await _redirect(send, f"{LOGIN_PAGE}?next={back}")
                return
            detail = "Not authenticated" if bearer(headers) is None else "Could not validate credentials"
            await _answer(send, 401, detail, [(b"www-authenticate", b"Bearer")])
            return
        if role is not None and role != AUTHENTICATED and not identity.has_role(role):
            if method in _AUDITED_METHODS:  # a refused change is worth a record too
                audit(identity, method, template or path, scope.get("query_string", b"").decode("latin-1"), 403)
            await _answer(send, 403, f'Role "{role}" is required to perform this action')
            return
        state["identity"] = identity
        if method not in _AUDITED_METHODS:
            await self.app(scope, receive, send)
            return
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            audit(identity, method, template or path, scope.get("query_string", b"").decode("latin-1"), status)

    @property
    def _login_page(self) -> bool:
        """Whether POST /auth/login can log anyone in (built-in users or an issuer's password grant)."""
        return self.settings.auth_users_file is not None or bool(self.settings.auth_oidc_login_url)

    async def _session(self, scope: Scope) -> Identity | None:
        """The session cookie's user; its token then stands in for the bearer header, so the
        services see this user (gateway.routes.common forwards the Authorization header)."""
        assert self.authenticator is not None
        token = cookie(scope)
        if token is None:
            return None
        identity = await self.authenticator.aauthenticate(token)
        if identity is None or identity.service is not None or identity.username == "token-user":
            return None  # a cookie holds a user's token, never a service's or a static one
        scope["headers"] = [(key, value) for key, value in scope.get("headers") or () if key != b"authorization"] + [
            (b"authorization", f"Bearer {token}".encode("latin-1"))
        ]
        return identity

    async def _identify(self, headers: dict[bytes, bytes], scope: Scope, template: str | None) -> Identity | None:
        assert self.authenticator is not None
        token = bearer(headers)
        if token is not None:
            return await self.authenticator.aauthenticate(token)
        if template == DOWNLOAD_ROUTE and self.settings.auth_signing_key:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            signed, image = query.get("token", [""])[-1], query.get("image", [""])[-1]
            if signed and image:
                try:
                    username = verify_download_token(signed, image, self.settings.auth_signing_key)
                except TokenError:
                    return None
                return Identity(username, frozenset({USER}))
            if image and not signed and scope.get("method") == "GET" and self.settings.auth_slicer_download_grants:
                app = scope.get("app")
                granted = (
                    await download_grants(app).take(image, client_address(scope), service_metadata(self.settings))
                    if app is not None
                    else None
                )
                if granted is not None:
                    audit_log.info(
                        "audit",
                        extra={"user": granted, "service": None, "method": "GET", "route": DOWNLOAD_ROUTE,
                               "query": f"image={image[:200]}", "status": 0, "grant": "slicer-download"},
                    )  # fmt: skip
                    return Identity(granted, frozenset({USER}))
        return None


def _cookie_route(method: str, template: str | None) -> bool:
    return template is not None and (("GET" if method == "HEAD" else method), template) in COOKIE_ROUTES


async def _redirect(send: Send, location: str) -> None:
    await send({
        "type": "http.response.start",
        "status": 303,
        "headers": [(b"location", location.encode("latin-1")), (b"content-length", b"0"), (b"cache-control", b"no-store")],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": b""})


def audit(identity: Identity, method: str, route: str, query: str, status: int) -> None:
    """One structured record per change: who (authenticated, not the client's client_id), what, result."""
    audit_log.info(
        "audit",
        extra={
            "user": identity.username,
            "service": identity.service,
            "method": method,
            "route": route,
            "query": query[:500],
            "status": status,
        },
    )
