"""What every router shares: dependencies, id checks, params parsing, file responses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
from fastapi import Depends, Request, UploadFile
from fastapi.responses import StreamingResponse
from google.protobuf import struct_pb2, timestamp_pb2
from labelgrid.common.v1 import common_pb2

from gateway.clients import Download, GrpcClients, open_download
from gateway.errors import GatewayError
from gateway.ranges import content_range, if_range_allows, parse_range
from gateway.settings import GatewaySettings
from services.common.auth import ANONYMOUS_ADMIN, Identity
from services.common.downloads import content_disposition, media_type

# The datastore's id rule (letters, digits, '.', '_', '-'; no leading '.'; no '..'); checked
# here too so a path-like id is a 400 before any call, and never becomes part of a resource
# name such as "images/a/labels/b".
_ID_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,199}")  # with fullmatch: "$" allows a final "\n"
# JSON a client sends (params, info, bodies) before it becomes a Struct: nesting and size bounded,
# so a 100k-deep array is a 4xx (not a RecursionError), and no message outgrows a gRPC call.
MAX_JSON_DEPTH = 32
MAX_JSON_BYTES = 4 * 1024 * 1024
SESSION_PREFIX = "session-"
"""Image ids older gateways gave their sessions (now the datastore's own resource, which drops
them at start); still refused for uploads through REST, as before."""


@dataclass
class Ctx:
    """Per-request access to the app's clients and settings, plus the caller's auth metadata."""

    clients: GrpcClients
    settings: GatewaySettings
    metadata: tuple[tuple[str, str], ...]
    # The gateway's own service token, for what it stores as itself (sessions); falls back to
    # the caller's metadata when no service token is configured.
    service_metadata: tuple[tuple[str, str], ...] = ()
    # Who is calling (set by gateway.auth.AuthMiddleware; MONAI Label's "admin" with auth off).
    identity: Identity = ANONYMOUS_ADMIN

    @property
    def timeout(self) -> float:
        return self.settings.rpc_timeout_seconds


def get_ctx(request: Request) -> Ctx:
    """The clients live on app.state (opened by the lifespan); the caller's bearer token is
    passed on, so the services check the caller's own roles. A request the auth middleware let
    in without one (a signed download link) reaches the services as the gateway itself."""
    settings: GatewaySettings = request.app.state.settings
    service = (("authorization", f"Bearer {settings.service_token}"),) if settings.service_token else ()
    auth = request.headers.get("authorization")
    metadata = (("authorization", auth),) if auth else service
    identity = getattr(request.state, "identity", None) or ANONYMOUS_ADMIN
    return Ctx(request.app.state.clients, settings, metadata, service or metadata, identity)


CtxDep = Depends(get_ctx)


def check_id(value: str | None, what: str = "image id") -> str:
    """Refuses empty and path-like ids (`../x`, `a/b`, NUL, ...) with a 400."""
    if not value:
        raise GatewayError(400, f"{what} is required")
    if ".." in value or not _ID_RE.fullmatch(value):
        raise GatewayError(
            400,
            f"invalid {what} {value[:80]!r}: use only letters, digits, '.', '_' and '-', "
            "not starting with '.', without '..', at most 200 characters",
        )
    return value


def check_user_image_id(value: str) -> str:
    check_id(value)
    if value.startswith(SESSION_PREFIX):
        raise GatewayError(400, f"image ids starting with {SESSION_PREFIX!r} are reserved for sessions")
    return value


def image_name(image_id: str) -> str:
    return f"images/{check_id(image_id)}"


def label_name(image_id: str, tag: str) -> str:
    return f"images/{check_id(image_id)}/labels/{check_id(tag, 'label tag')}"


def parse_json_field(value: str | None, field: str) -> dict[str, Any]:
    """A form field holding a JSON object (MONAI Label's `params`/`info`): a 422 if it is not one,
    in FastAPI's validation shape (MONAI Label answered 500 here)."""
    if value is None or value.strip() == "":
        return {}
    if len(value) > MAX_JSON_BYTES:
        raise GatewayError(413, f"the {field} field is {len(value)} bytes of JSON, over the limit of {MAX_JSON_BYTES}")
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, RecursionError) as err:
        raise GatewayError(422, [_invalid(field, f"Invalid JSON: {err}", value, "json_invalid")]) from None
    if not isinstance(parsed, dict):
        raise GatewayError(422, [_invalid(field, "Input should be a JSON object", value, "dict_type")])
    return parsed


def _invalid(field: str, msg: str, value: str, kind: str) -> dict[str, Any]:
    return {"type": kind, "loc": ["body", field], "msg": msg, "input": value[:200]}


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in `value` (a scalar is 0); iterative, so any depth is fine."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    """A JSON object as a Struct; a value Struct cannot hold is a 422, not a 500, and so is JSON
    nested deeper than MAX_JSON_DEPTH (413 when it serializes to more than MAX_JSON_BYTES)."""
    if json_depth(value) > MAX_JSON_DEPTH:
        raise GatewayError(422, f"JSON nested deeper than {MAX_JSON_DEPTH} levels is not accepted")
    out = struct_pb2.Struct()
    try:
        out.update(value)
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        raise GatewayError(422, f"unsupported value in JSON: {err}") from None
    if out.ByteSize() > MAX_JSON_BYTES:
        raise GatewayError(413, f"JSON of {out.ByteSize()} bytes is over the limit of {MAX_JSON_BYTES}")
    return out


def base_name(file_name: str | None) -> str:
    """The official client sends the local path as the file name; keep its last part only."""
    name = (file_name or "").replace("\\", "/").rsplit("/", 1)[-1]
    return name.strip()


def upload_size(upload: UploadFile) -> int:
    return int(upload.size or 0)


def etag_of(info: Any) -> str:
    """The ETag of a download: its sha256, quoted; empty when the service sent none."""
    return f'"{info.sha256}"' if info.sha256 else ""


def file_response(
    download: Download, file_name: str | None = None, *, ranges: bool = False, partial: bool = False
) -> StreamingResponse:
    """A download stream as a file response with length and Content-Disposition.

    `ranges`: the route answers byte ranges (gateway.ranges), so it says so; `partial`: the
    stream is the range asked for, answered as a 206 with its Content-Range.
    """
    info = download.first.info
    name = file_name or info.file_name
    headers = {
        "content-disposition": content_disposition(name),
        "content-length": str(info.read_size_bytes or info.size_bytes),
    }
    if etag := etag_of(info):
        headers["etag"] = etag
    if ranges or partial:
        headers["accept-ranges"] = "bytes"
    status = 200
    if partial:
        status = 206
        headers["content-range"] = content_range(info.read_offset, info.read_size_bytes, info.size_bytes)
    return StreamingResponse(
        read_ahead(download.chunks()), status_code=status, media_type=media_type(name), headers=headers
    )


async def ranged_file_response(
    request: Request, start: Callable[[int, int], Any], name_of: Callable[[Any], str | None] = lambda info: None
) -> StreamingResponse:
    """A file streamed from the datastore: the whole file, or the one byte range the client asked
    for (gateway.ranges), as MONAI Label's FileResponse answers. `start(read_offset, read_limit)`
    starts the download call; `name_of(info)` names the file once its info arrived (None: the
    stored name) and may refuse it by raising."""

    def answer(download: Download, partial: bool = False) -> StreamingResponse:
        try:
            file_name = name_of(download.first.info)
        except BaseException:
            download.call.cancel()
            raise
        return file_response(download, file_name, ranges=True, partial=partial)

    wanted = parse_range(request.headers.get("range"))
    if wanted is None:
        return answer(await open_download(lambda: start(0, 0)))
    offset, limit = wanted.read(int((await _file_info(start)).size_bytes) if wanted.needs_size else None)
    try:
        download: Download | None = await open_download(lambda: start(offset, limit))
    except grpc.aio.AioRpcError as err:
        if err.code() is not grpc.StatusCode.OUT_OF_RANGE:
            raise
        download = None
    if download is None or not download.first.info.read_size_bytes:
        if download is not None:
            download.call.cancel()
        info = download.first.info if download is not None else await _file_info(start)
        name_of(info)  # a file the route refuses is refused with or without a range
        raise GatewayError(
            416,
            f"the range asked for ({request.headers['range'][:100]}) starts past the end of the file",
            headers={"content-range": f"bytes */{info.size_bytes}"},
        )
    if not if_range_allows(request.headers.get("if-range"), etag_of(download.first.info)):
        download.call.cancel()  # the client's copy is another version: the whole file
        return answer(await open_download(lambda: start(0, 0)))
    return answer(download, partial=True)


async def _file_info(start: Callable[[int, int], Any]) -> Any:
    """The file's info (its size, name, sha256), from the first message of a one-byte read."""
    probe = await open_download(lambda: start(0, 1))
    probe.call.cancel()
    return probe.first.info


READ_AHEAD_CHUNKS = 4
"""Download chunks the gateway reads from the service while it sends earlier ones."""


async def read_ahead(chunks: AsyncIterator[bytes], depth: int = READ_AHEAD_CHUNKS) -> AsyncIterator[bytes]:
    """`chunks`, read by a task of their own up to `depth` ahead: the next gRPC messages arrive
    while this one is written to the client (uvicorn waits for each 1 MiB to drain, so reading
    only after each write left both sides idle half the time). The reader is cancelled, and
    with it the call, when the client goes away."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=depth)
    done = object()

    async def fill() -> None:
        try:
            async for chunk in chunks:
                await queue.put(chunk)
            await queue.put(done)
        except Exception as exc:  # noqa: BLE001 - raised in the sender
            await queue.put(exc)

    reader = asyncio.create_task(fill())
    try:
        while True:
            item = await queue.get()
            if item is done:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


# -- MONAI Label's task objects (training and scoring runs) -----------------------------------

_TASK_STATUS = {
    common_pb2.JOB_STATE_QUEUED: "SUBMITTED",
    common_pb2.JOB_STATE_RUNNING: "RUNNING",
    common_pb2.JOB_STATE_SUCCEEDED: "DONE",
    common_pb2.JOB_STATE_FAILED: "ERROR",
    common_pb2.JOB_STATE_CANCELLED: "STOPPED",
}


def task_status(state: int) -> str:
    """A JobState as MONAI Label's task status (SUBMITTED, RUNNING, DONE, ERROR, STOPPED)."""
    return _TASK_STATUS.get(state, "SUBMITTED")


def task_time(stamp: timestamp_pb2.Timestamp) -> str:
    """MONAI Label's task times: server local time, "YYYY-MM-DD HH:MM:SS"."""
    return datetime.fromtimestamp(stamp.seconds).strftime("%Y-%m-%d %H:%M:%S")


TASK_DETAIL_LINES = 20  # of a job's log tail, in MONAI Label's task `details`


def with_task_outcome(task: dict[str, Any], job: Any) -> dict[str, Any]:
    """Adds what a job (training or batch inference) has done to its MONAI Label task: `details`
    (the end of its log, and the error of a failed job) once it started, `end_ts` once it ended."""
    if job.state != common_pb2.JOB_STATE_QUEUED:
        details = list(job.log_tail)[-TASK_DETAIL_LINES:]
        if job.state == common_pb2.JOB_STATE_FAILED and job.error.message:
            details.append(f"{job.error.reason}: {job.error.message}")
        task["details"] = details
    if job.times.HasField("end_time"):
        task["end_ts"] = task_time(job.times.end_time)
    return task


async def all_pages(list_page: Callable[[str], Awaitable[Any]]) -> AsyncIterator[Any]:
    """Every page of a paged List RPC: `list_page(token)` asks for one, until next_page_token is empty."""
    token = ""
    while True:
        page = await list_page(token)
        yield page
        token = page.next_page_token
        if not token:
            return


def task_answer(
    jobs: Sequence[Any], check_if_running: bool, all: bool, what: str, to_json: Callable[[Any], dict[str, Any]]
) -> Any:
    """MONAI Label's GET answer for a kind of task, from its jobs newest first (only the running
    ones with check_if_running): that running one, every one oldest first with `all`, else the newest."""
    if check_if_running:
        if not jobs:
            raise GatewayError(404, f"No {what} Tasks are currently Running")
        return to_json(jobs[0])
    if not jobs:
        raise GatewayError(404, f"No {what} Tasks Found")
    if all:
        return [to_json(job) for job in reversed(jobs)]  # oldest first, as MONAI Label lists them
    return to_json(jobs[0])
