"""MONAI Label's GET /logs/ and /logs/gpu (`endpoints/logs.py`); the OHIF panel links to
`logs/?lines=100`.

/logs/ answers a tail of one log: the file `labelgrid up` writes the whole stack's output to
(the gateway's `log_file` setting), else the gateway's own recent records, kept in memory.
No request parameter names a file, and the tail is bounded in lines and bytes. As MONAI
Label: `html=true` (the default) is a page that loads `?text=true` (and reloads it every
`refresh` seconds, at least 3), `text=true` or `html=false` the plain text. The page is
self-contained (MONAI Label's loads jQuery and ace from CDNs).

/logs/gpu is `nvidia-smi`'s output where the gateway runs on a GPU host; elsewhere (MONAI
Label answers 500 there) the inference service's devices, as it reports them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import html
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse
from labelgrid.common.v1 import common_pb2
from labelgrid.inference.v1 import inference_service_pb2 as inf_pb

from gateway.errors import GatewayError, from_rpc_error
from gateway.routes.common import Ctx, CtxDep

router = APIRouter(prefix="/logs", tags=["Others"])

MAX_LINES = 10_000
"""At most this many lines per answer (MONAI Label's `lines<=0`, the whole file, too)."""
MAX_TAIL_BYTES = 4 * 1024 * 1024
"""At most this much of the end of the file is read."""
RECENT_LINES = 2_000
"""Lines of the gateway's own log kept in memory when no log file is configured."""
NVIDIA_SMI_TIMEOUT_S = 10.0


class RecentLog(logging.Handler):
    """The last RECENT_LINES log records of this process, formatted, for /logs/ without a file."""

    def __init__(self, capacity: int = RECENT_LINES) -> None:
        super().__init__(logging.DEBUG)
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self.lines_lock = threading.Lock()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a bad record must not break the caller's logging
            return
        with self.lines_lock:
            self.lines.extend(text.splitlines() or [""])

    def tail(self, count: int) -> list[str]:
        with self.lines_lock:
            return list(self.lines)[-count:]


@contextlib.contextmanager
def recent_log() -> Iterator[RecentLog]:
    """Keeps the process's records (root logger) in a RecentLog for as long as the app runs."""
    handler = RecentLog()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def tail_file(path: Path, count: int, max_bytes: int = MAX_TAIL_BYTES) -> list[str]:
    """The last `count` lines of `path`, reading at most its last `max_bytes` bytes."""
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        start = max(0, size - max_bytes)
        handle.seek(start)
        data = handle.read(size - start)
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start > 0 and lines:
        lines = lines[1:]  # the first one is cut
    return lines[-count:]


_PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>labelgrid logs</title>
<style>
  body {{ margin: 0; font-family: monospace; font-size: medium; }}
  pre {{ margin: 0; padding: 0.5em; white-space: pre-wrap; }}
</style>
</head>
<body>
<pre id="log">{text}</pre>
<script>
  const url = new URL(window.location.href);
  url.searchParams.set("text", "true");
  async function refreshLog() {{
    const answer = await fetch(url, {{credentials: "same-origin"}});
    if (answer.ok) {{
      document.getElementById("log").textContent = await answer.text();
      window.scrollTo(0, document.body.scrollHeight);
    }}
  }}
  window.scrollTo(0, document.body.scrollHeight);
  {refresh}
</script>
</body>
</html>
"""


def _check_token(request: Request) -> None:
    """Logs are for admins in MONAI Label; with auth on, a configured bearer token is needed
    (no gRPC service is called for /logs/ that would check it)."""
    # gateway.auth.AuthMiddleware authenticated the caller and checked monailabel-admin before
    # this ran; it leaves the identity here. Defence in depth.
    settings = request.app.state.settings
    if settings.auth_enabled and getattr(request.state, "identity", None) is None:
        raise GatewayError(401, "Could not validate credentials", {"WWW-Authenticate": "Bearer"})


async def _log_lines(request: Request, count: int) -> list[str]:
    log_file: Path | None = request.app.state.settings.log_file
    if log_file is None:
        recent: RecentLog | None = getattr(request.app.state, "recent_log", None)
        return recent.tail(count) if recent is not None else []
    try:
        return await asyncio.to_thread(tail_file, log_file, count)
    except FileNotFoundError:
        raise GatewayError(404, "Log File NOT Found (nothing has been logged yet)") from None
    except (IsADirectoryError, PermissionError):
        raise GatewayError(404, "Log File NOT Found (the configured log file cannot be read)") from None


@router.get("/", summary="Get Logs")
async def get_logs(
    request: Request,
    lines: int = Query(300, description=f"last lines to show; 0 or less: as many as allowed ({MAX_LINES})"),
    html_page: bool = Query(True, alias="html"),
    text: bool = False,
    refresh: int = Query(0, ge=0, le=86_400, description="seconds between reloads of the page (at least 3); 0: none"),
) -> Any:
    _check_token(request)
    count = MAX_LINES if lines <= 0 else min(lines, MAX_LINES)
    tail = await _log_lines(request, count)
    body = "".join(f"{line}\n" for line in tail)
    if text or not html_page:
        return PlainTextResponse(body)
    seconds = max(refresh, 3) if refresh else 0
    reload = f"setInterval(refreshLog, {seconds * 1000});" if seconds else ""
    return HTMLResponse(_PAGE.format(text=html.escape(body), refresh=reload))


def _nvidia_smi() -> str | None:
    """nvidia-smi's output on this host; None where there is none (or it fails)."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        done = subprocess.run(
            [binary], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=NVIDIA_SMI_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.decode("utf-8", errors="replace") if done.returncode == 0 else None


def _devices_text(devices: Any) -> str:
    rows = []
    for device in devices:
        kind = common_pb2.DeviceKind.Name(device.kind).removeprefix("DEVICE_KIND_")
        memory = f"{device.memory_used_bytes // 2**20}MiB / {device.memory_total_bytes // 2**20}MiB"
        rows.append(f"{device.name:<10} {kind:<6} {memory:<24} {device.description}".rstrip())
    gpus = [d for d in devices if d.kind == common_pb2.DEVICE_KIND_CUDA]
    head = "nvidia-smi is not available on the gateway host; devices of the inference service:"
    tail = "" if gpus else "\nNo NVIDIA GPU: inference runs on the CPU."
    return "\n".join([head, *rows]) + tail + "\n"


@router.get("/gpu", summary="Get GPU Info (nvidia-smi)")
async def gpu_info(request: Request, ctx: Ctx = CtxDep) -> PlainTextResponse:
    _check_token(request)
    output = await asyncio.to_thread(_nvidia_smi)
    if output is not None:
        return PlainTextResponse(output)
    try:
        answer = await ctx.clients.inference.ListDevices(
            inf_pb.ListDevicesRequest(), timeout=ctx.timeout, metadata=ctx.metadata
        )
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err, service="inference", address=ctx.settings.inference_address) from None
    return PlainTextResponse(_devices_text(answer.devices))
