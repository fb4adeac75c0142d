"""MONAI Label's /session router (`endpoints/session.py`) on the datastore's session RPCs.

A session is the datastore's own resource ("sessions/{session}"): it picks the id, keeps the
volume, enforces the caps (live sessions per client and in all) and the expiry. Each route
is one call: PUT -> CreateSession, GET -> GetSession (update_ts -> touch) or DownloadSession
(image=true), DELETE -> DeleteSession. What stays here is MONAI Label's REST shape: several
uploaded files (a DICOM series) become one ZIP, the owner is named, and answers are
session_info dicts.
"""

from __future__ import annotations

import asyncio
import tempfile
import zipfile
from typing import Annotated, Any, BinaryIO

import grpc
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import resources_pb2 as ds_res

from gateway.clients import CHUNK_SIZE, Readable, upload_stream
from gateway.errors import GatewayError, from_rpc_error
from gateway.routes.common import Ctx, CtxDep, base_name, ranged_file_response, upload_size
from services.common.protos import struct_to_dict

router = APIRouter(prefix="/session", tags=["Session"])


def _require_enabled(ctx: Ctx) -> None:
    if not ctx.settings.sessions_enabled:
        raise GatewayError(406, "Session Feature is Not Enabled")


def owner_of(ctx: Ctx, client_id: str | None) -> str:
    """Whose allowance a new session counts against: the authenticated user when auth is on
    (a client cannot pick another name), else the client_id MONAI Label clients send."""
    if ctx.settings.auth_enabled:
        return f"user:{ctx.identity.username}"
    return f"client:{client_id or ''}"


def session_info(session: ds_res.Session) -> dict[str, Any]:
    """MONAI Label's session_info, without server paths (path/image name the session instead)."""
    return {
        "name": session.session_id,
        "path": f"sessions/{session.session_id}",
        "image": session.file_name,
        "meta": struct_to_dict(session.meta),
        "create_ts": int(session.create_time.seconds),
        "last_access_ts": int(session.last_access_time.seconds),
        "expiry": int(session.expiry_seconds),
    }


class _ThreadFile:
    """A local temp file read off the event loop, for upload_stream."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file

    async def read(self, size: int = -1) -> bytes:
        return await asyncio.to_thread(self.file.read, size)


def _zip_uploads(uploads: list[UploadFile], target: BinaryIO) -> None:
    """Several files (a DICOM series) become one ZIP, copied chunk by chunk."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for index, upload in enumerate(uploads):
            name = base_name(upload.filename) or f"file_{index:05d}.dcm"
            upload.file.seek(0)
            with archive.open(f"{index:05d}_{name}", "w", force_zip64=True) as member:
                while data := upload.file.read(CHUNK_SIZE):
                    member.write(data)
    target.seek(0)


async def _create(ctx: Ctx, header: ds_pb.CreateSessionHeader, source: Readable) -> ds_res.Session:
    response = await ctx.clients.datastore.CreateSession(
        upload_stream(ds_pb.CreateSessionRequest, header, source), metadata=ctx.service_metadata
    )
    return response.session


@router.put("/", summary="Create new session with Image")
async def create_session(
    files: Annotated[list[UploadFile], File()],
    uncompress: bool = Query(False),
    expiry: int = Query(0, ge=0),
    client_id: str | None = Form(None),
    ctx: Ctx = CtxDep,
) -> dict[str, Any]:
    _require_enabled(ctx)
    if any(upload_size(f) == 0 for f in files):
        raise GatewayError(422, "an uploaded session file is empty")
    single = len(files) == 1
    # A series is zipped; the datastore names the session, so the archive gets a neutral name.
    file_name = base_name(files[0].filename) if single else "series.zip"
    if not file_name:
        raise GatewayError(422, "the session upload needs a file name (its extension selects the format)")
    header = ds_pb.CreateSessionHeader(
        file_name=file_name,
        owner=owner_of(ctx, client_id),
        expiry_seconds=min(expiry or ctx.settings.session_expiry, ctx.settings.session_expiry),
    )
    try:
        if single:
            header.size_bytes = upload_size(files[0])
            session = await _create(ctx, header, files[0])
        else:
            with tempfile.TemporaryFile() as archive:
                await asyncio.to_thread(_zip_uploads, files, archive)
                header.size_bytes = archive.seek(0, 2)
                archive.seek(0)
                session = await _create(ctx, header, _ThreadFile(archive))
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err, invalid_status=422) from None
    return {"session_id": session.session_id, "session_info": session_info(session)}


def _not_found(err: grpc.aio.AioRpcError, detail: str) -> GatewayError:
    """MONAI Label's 404 for an unknown, expired or malformed session id."""
    if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
        return GatewayError(404, detail)
    return from_rpc_error(err)


@router.get("/{session_id}", summary="Get Session ID")
async def get_session(
    session_id: str,
    request: Request,
    update_ts: bool = Query(False),
    image: bool = Query(False),
    ctx: Ctx = CtxDep,
) -> Any:
    _require_enabled(ctx)
    name = f"sessions/{session_id}"
    detail = f"Session ({session_id}) Not Found"
    try:
        if image:
            return await ranged_file_response(
                request,
                lambda offset, limit: ctx.clients.datastore.DownloadSession(
                    ds_pb.DownloadSessionRequest(name=name, read_offset=offset, read_limit=limit),
                    metadata=ctx.service_metadata,
                ),
            )
        response = await ctx.clients.datastore.GetSession(
            ds_pb.GetSessionRequest(name=name, touch=update_ts), timeout=ctx.timeout, metadata=ctx.service_metadata
        )
    except grpc.aio.AioRpcError as err:
        raise _not_found(err, detail) from None
    return session_info(response.session)


@router.delete("/{session_id}", summary="Delete Session")
async def remove_session(session_id: str, ctx: Ctx = CtxDep) -> dict[str, Any]:
    _require_enabled(ctx)
    try:
        response = await ctx.clients.datastore.DeleteSession(
            ds_pb.DeleteSessionRequest(name=f"sessions/{session_id}"),
            timeout=ctx.timeout,
            metadata=ctx.service_metadata,
        )
    except grpc.aio.AioRpcError as err:
        raise _not_found(err, "Session Not Found") from None
    return session_info(response.session)
