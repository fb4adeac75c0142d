"""MONAI Label's /session router (`endpoints/session.py`); storage is in gateway.sessions."""

from __future__ import annotations

import asyncio
import tempfile
import time
import zipfile
from typing import Annotated, Any, BinaryIO

import grpc
from fastapi import APIRouter, File, Form, Query, UploadFile
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb

from gateway import sessions
from gateway.clients import CHUNK_SIZE, Readable, open_download, upload_stream
from gateway.errors import GatewayError, from_rpc_error
from gateway.routes.common import (
    Ctx,
    CtxDep,
    base_name,
    file_response,
    to_struct,
    upload_size,
)

router = APIRouter(prefix="/session", tags=["Session"])


def _require_enabled(ctx: Ctx) -> None:
    if not ctx.settings.sessions_enabled:
        raise GatewayError(406, "Session Feature is Not Enabled")


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


async def _upload_session_image(
    ctx: Ctx, session: sessions.Session, source: Readable, file_name: str, size: int
) -> None:
    header = ds_pb.UploadImageHeader(
        image_id=session.image_id,
        file_name=file_name,
        info=to_struct(
            {
                "session": True,
                "expiry_ts": session.data["expiry_ts"],
                "client_id": session.data.get("client_id"),
            }
        ),
        size_bytes=size,
    )
    await ctx.clients.datastore.UploadImage(
        upload_stream(ds_pb.UploadImageRequest, header, source), metadata=ctx.service_metadata
    )


async def _check_quota(ctx: Ctx, owner: str) -> None:
    """A 429 when the caller already holds sessions_per_client live sessions, or all callers
    together sessions_max (live_sessions also removes expired ones, which frees their places)."""
    live = await sessions.live_sessions(ctx)
    settings = ctx.settings
    if len(live) >= settings.sessions_max:
        raise GatewayError(
            429,
            f"too many sessions: {len(live)} are live, the limit is {settings.sessions_max}; retry once some end or expire",
        )
    held = sum(1 for session in live if session.owner == owner)
    if held >= settings.sessions_per_client:
        raise GatewayError(
            429,
            f"too many sessions for this client: it holds {held}, the limit is {settings.sessions_per_client}; "
            "delete one (DELETE /session/{id}) or wait until one expires",
        )


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
    now = int(time.time())
    expiry = min(expiry or ctx.settings.session_expiry, ctx.settings.session_expiry)
    session_id = sessions.new_session_id()
    single = len(files) == 1
    file_name = base_name(files[0].filename) if single else f"{session_id}.zip"
    if not file_name:
        raise GatewayError(
            422,
            "the session upload needs a file name (its extension selects the format)",
        )
    owner = sessions.owner_of(ctx, client_id)
    await _check_quota(ctx, owner)
    session = sessions.Session(
        session_id,
        {
            "file_name": file_name,
            "create_ts": now,
            "last_access_ts": now,
            "expiry": expiry,
            "expiry_ts": now + expiry,
            "client_id": client_id or "",
            "owner": owner,
            "uncompress": uncompress,
            "meta": {},
        },
    )
    # The record first: if the upload never lands, the record expires and cleans up after itself.
    await sessions.put_record(ctx, session)
    try:
        if single:
            await _upload_session_image(ctx, session, files[0], file_name, upload_size(files[0]))
        else:
            with tempfile.TemporaryFile() as archive:
                await asyncio.to_thread(_zip_uploads, files, archive)
                size = archive.seek(0, 2)
                archive.seek(0)
                await _upload_session_image(ctx, session, _ThreadFile(archive), file_name, size)
    except grpc.aio.AioRpcError as err:
        await sessions.delete_session(ctx, session)
        raise from_rpc_error(err, invalid_status=422) from None
    return {"session_id": session_id, "session_info": session.info()}


async def _live(ctx: Ctx, session_id: str, detail: str) -> sessions.Session:
    _require_enabled(ctx)
    session = await sessions.get_session(ctx, session_id)
    if session is None:
        raise GatewayError(404, detail)
    return session


@router.get("/{session_id}", summary="Get Session ID")
async def get_session(
    session_id: str,
    update_ts: bool = Query(False),
    image: bool = Query(False),
    ctx: Ctx = CtxDep,
) -> Any:
    session = await _live(ctx, session_id, f"Session ({session_id}) Not Found")
    if update_ts:
        session.data["last_access_ts"] = int(time.time())
        await sessions.put_record(ctx, session)
    if image:
        name = f"images/{session.image_id}"
        download = await open_download(
            lambda: ctx.clients.datastore.DownloadImage(
                ds_pb.DownloadImageRequest(name=name), metadata=ctx.service_metadata
            )
        )
        return file_response(download, session.data.get("file_name") or None)
    return session.info()


@router.delete("/{session_id}", summary="Delete Session")
async def remove_session(session_id: str, ctx: Ctx = CtxDep) -> dict[str, Any]:
    session = await _live(ctx, session_id, "Session Not Found")
    await sessions.delete_session(ctx, session)
    return session.info()
