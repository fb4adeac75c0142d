"""GET /ohif/...: the built OHIF v3 viewer with MONAI Label's panel, as MONAI Label serves it.

The build is the one inside MONAI Label 0.8.5's wheel (`monailabel/endpoints/static/ohif/`,
installed --no-deps by `make install` and the Docker image; never copied into git), or the
folder in `ohif_dir`. Its `app-config.js` reads DICOM through `/proxy/dicom/{qido,wado}` on
this origin, so without a DICOMweb server the viewer cannot show anything: then the entry
page says so instead of opening an empty study list.

A path names a file under the build or nothing: `..`, backslashes and NUL are refused, and
a resolved path (symlinks followed) outside the build is treated as missing. A missing path
is the SPA's own route (`/ohif/viewer?StudyInstanceUIDs=...`) and answers index.html.
"""

from __future__ import annotations

import functools
import html
import importlib.util
import mimetypes
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from gateway.errors import GatewayError

router = APIRouter(tags=["Others"])

# Types browsers insist on (WebAssembly.instantiateStreaming needs application/wasm; module
# scripts need a JavaScript type); the rest from the mimetypes table.
_MEDIA_TYPES = {
    ".wasm": "application/wasm",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".ico": "image/x-icon",
    ".png": "image/png",
}
# Bundles and wasm carry a content hash in their name; the entry page and config do not.
_NO_CACHE = {"index.html", "app-config.js", "sw.js", "init-service-worker.js"}

NEEDS_DICOMWEB = (
    "OHIF needs a DICOMweb source: labelgrid serves it DICOM through /proxy/dicom/, which "
    "forwards to the DICOMweb server given by `labelgrid up --studies http://HOST:PORT/dicom-web` "
    "(or LABELGRID_DICOMWEB_URL for the gateway). With a local or S3 studies folder, use 3D "
    "Slicer or the REST API instead."
)


@functools.cache
def wheel_ohif_dir() -> Path | None:
    """`monailabel/endpoints/static/ohif` of the installed wheel, found without importing it."""
    spec = importlib.util.find_spec("monailabel")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "endpoints" / "static" / "ohif"
        if (folder / "index.html").is_file():
            return folder.resolve()
    return None


def ohif_root(request: Request) -> Path:
    configured = request.app.state.settings.ohif_dir
    root = Path(configured).resolve() if configured else wheel_ohif_dir()
    if root is None or not (root / "index.html").is_file():
        raise GatewayError(
            503,
            "the OHIF viewer is not installed: install MONAI Label's wheel without its "
            "dependencies (pip install --no-deps monailabel==0.8.5; `make install` does) "
            "or set LABELGRID_OHIF_DIR to a built OHIF v3 folder",
        )
    return root


def media_type(path: Path) -> str:
    known = _MEDIA_TYPES.get(path.suffix.lower())
    if known:
        return known
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


def _file(path: Path) -> FileResponse:
    cache = "no-cache" if path.name in _NO_CACHE else "public, max-age=86400"
    return FileResponse(path, media_type=media_type(path), headers={"Cache-Control": cache})


def _needs_dicomweb_page() -> HTMLResponse:
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>OHIF needs a DICOMweb source"
        "</title></head><body><h1>OHIF needs a DICOMweb source</h1>"
        f"<p>{html.escape(NEEDS_DICOMWEB)}</p></body></html>"
    )
    return HTMLResponse(body, status_code=503, headers={"Cache-Control": "no-cache"})


def resolve(root: Path, path: str) -> Path | None:
    """The file `path` names under `root`, or None (missing, a folder, or outside the build)."""
    if "\\" in path or "\x00" in path:
        raise GatewayError(400, "invalid OHIF path")
    parts = [part for part in path.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise GatewayError(400, "invalid OHIF path: '.' and '..' are not allowed")
    if not parts:
        return None
    candidate = root.joinpath(*parts)
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a symlink loop, a name too long
        return None
    if not resolved.is_relative_to(root) or not resolved.is_file():
        return None
    return resolved


@router.get("/ohif", include_in_schema=False)
async def ohif_redirect() -> Response:
    return RedirectResponse("/ohif/", status_code=307)


@router.api_route("/ohif/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
async def ohif(request: Request, path: str) -> Response:
    root = ohif_root(request)
    found = resolve(root, path)
    if found is not None and found.name != "index.html":
        return _file(found)
    # The entry page (or an SPA route): useless without a DICOMweb server behind the proxy.
    if not request.app.state.settings.dicomweb_url:
        return _needs_dicomweb_page()
    return _file(root / "index.html")
