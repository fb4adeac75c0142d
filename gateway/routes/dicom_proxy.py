"""/proxy/dicom/...: MONAI Label's DICOMweb proxy, OHIF's data source on the REST API's origin.

`/proxy/dicom/{qido,wado,stow}/<path>` go to `<dicomweb_url>/<prefix>/<path>` (the prefixes are
MONAI Label's MONAI_LABEL_{QIDO,WADO,STOW}_PREFIX, empty by default) and `/proxy/dicom/<path>`
to `<dicomweb_url>/<path>`; like MONAI Label, a QIDO path ending in `metadata` goes to WADO.
Bodies stream both ways (a STOW of any size is never held in memory; multipart/related
answers are passed on as they arrive, with their content type). The DICOMweb server's
credentials (basic or bearer) are added here and never logged; the caller's own
Authorization (a labelgrid token) is checked, not forwarded.

A DICOMweb server that is down, refuses the connection or stops answering is a 503 with the
reason; one that refuses labelgrid's credentials is a 502 (the caller cannot fix it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from gateway.errors import GatewayError
from gateway.settings import GatewaySettings

log = logging.getLogger("labelgrid.gateway.dicom_proxy")

router = APIRouter(prefix="/proxy", tags=["Others"])

# Request headers passed on; everything else (the caller's Authorization and cookies, Host,
# hop-by-hop headers) stays here.
_FORWARD_REQUEST = ("accept", "accept-encoding", "content-type", "content-length", "content-encoding")
# Response headers never passed back: hop-by-hop, and the server's own auth / cookies.
_DROP_RESPONSE = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "www-authenticate",
    "set-cookie",
    "server",
}


class DicomProxy:
    """One pooled httpx client to the configured DICOMweb server, for the app's life."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.base = settings.dicomweb_url.rstrip("/")
        headers: dict[str, str] = {}
        auth: httpx.Auth | None = None
        token = settings.dicomweb_token.get_secret_value()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif settings.dicomweb_username:
            auth = httpx.BasicAuth(settings.dicomweb_username, settings.dicomweb_password.get_secret_value())
        timeout = settings.dicomweb_timeout_seconds
        self.client = httpx.AsyncClient(
            headers=headers,
            auth=auth,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def target(self, op: str, path: str) -> str:
        """The upstream URL of `/proxy/dicom/<op>/<path>`; path-like tricks are a 400."""
        if "\\" in path or "\x00" in path:
            raise GatewayError(400, "invalid DICOMweb path")
        parts = [part for part in path.split("/") if part]
        if any(part in (".", "..") for part in parts):
            raise GatewayError(400, "invalid DICOMweb path: '.' and '..' are not allowed")
        settings = self.settings
        prefixes = {
            "qido": settings.dicomweb_qido_prefix,
            "wado": settings.dicomweb_wado_prefix,
            "stow": settings.dicomweb_stow_prefix,
        }
        prefix = prefixes.get(op, "")
        # Some OHIF versions ask QIDO for series metadata, which is a WADO-RS resource.
        if op == "qido" and path.rstrip("/").endswith("metadata"):
            prefix = settings.dicomweb_wado_prefix
        segments = [segment for segment in prefix.split("/") if segment]
        segments += [quote(part, safe="@:=,;+!$&'()*~") for part in parts]
        return "/".join([self.base, *segments])

    async def forward(self, request: Request, op: str, path: str) -> StreamingResponse:
        if not self.base:
            raise GatewayError(
                503,
                "no DICOMweb server is configured: start labelgrid with "
                "--studies http://HOST:PORT/dicom-web (or set LABELGRID_DICOMWEB_URL)",
            )
        url = self.target(op, path)
        headers = {name: request.headers[name] for name in _FORWARD_REQUEST if name in request.headers}
        body: AsyncIterator[bytes] | None = request.stream() if request.method == "POST" else None
        query = request.url.query  # passed on as sent (QIDO's includefield=a,b, fuzzy matching, ...)
        upstream_request = self.client.build_request(
            request.method,
            f"{url}?{query}" if query else url,
            headers=headers,
            content=body,
        )
        try:
            upstream = await self.client.send(upstream_request, stream=True)
        except httpx.TimeoutException as err:
            raise GatewayError(
                503, f"the DICOMweb server {self.base} did not answer in time ({type(err).__name__})"
            ) from None
        except httpx.HTTPError as err:
            raise GatewayError(503, f"the DICOMweb server {self.base} is unavailable: {_reason(err)}") from None
        if upstream.status_code in (401, 403):
            await upstream.aclose()
            raise GatewayError(
                502,
                f"the DICOMweb server {self.base} refused labelgrid's credentials ({upstream.status_code}); "
                "check LABELGRID_DICOMWEB_USERNAME/_PASSWORD or _TOKEN",
            )
        log.debug("proxy %s %s -> %s %d", request.method, request.url.path, url, upstream.status_code)
        response_headers = {
            name: value for name, value in upstream.headers.items() if name.lower() not in _DROP_RESPONSE
        }
        return StreamingResponse(
            _relay(upstream),
            status_code=upstream.status_code,
            headers=response_headers,
            background=BackgroundTask(upstream.aclose),
        )


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    """The body as it arrives, still encoded (content-encoding / length pass through as is)."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as err:  # the server went away mid-answer: the client sees a cut body
        log.warning("DICOMweb answer cut off: %s", _reason(err))


def _reason(err: httpx.HTTPError) -> str:
    text = str(err) or type(err).__name__
    return text[:300]


def _check_caller(request: Request) -> None:
    """With auth on, the proxy (which adds the PACS credentials) is for token holders only."""
    # gateway.auth.AuthMiddleware authenticated the caller and checked the route's role
    # (monailabel-user) before this ran; it leaves the identity here. Defence in depth.
    settings = request.app.state.settings
    if settings.auth_enabled and getattr(request.state, "identity", None) is None:
        raise GatewayError(401, "Could not validate credentials", {"WWW-Authenticate": "Bearer"})


def _proxy(request: Request) -> DicomProxy:
    return request.app.state.dicom_proxy


@router.api_route("/dicom/{op}/{path:path}", methods=["GET", "POST"], include_in_schema=False)
async def proxy_op(request: Request, op: str, path: str) -> StreamingResponse:
    _check_caller(request)
    if op not in ("qido", "wado", "stow"):
        # MONAI Label's plain /proxy/dicom/{path}: `op` is the path's first segment.
        return await _proxy(request).forward(request, "", f"{op}/{path}")
    return await _proxy(request).forward(request, op, path)


@router.api_route("/dicom/{path}", methods=["GET", "POST"], include_in_schema=False)
async def proxy_plain(request: Request, path: str) -> StreamingResponse:
    _check_caller(request)
    return await _proxy(request).forward(request, "", path)
