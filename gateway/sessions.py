"""Sessions (MONAI Label's /session/) kept in the datastore, so the gateway stays stateless.

A session is an ordinary datastore image with id `session-<uuid>` (so the inference service
reads it by name like any image) plus a record `records/sessions/<uuid>` holding its times.
The records make sessions cheap to count (to leave them out of /info/ and /datastore/
counts) and to expire: an expired session is deleted lazily, whenever it is looked up or
sessions are counted. No proto change was needed.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb

from gateway.clients import found_or_none
from gateway.routes.common import SESSION_PREFIX, Ctx, to_struct
from services.common.protos import struct_to_dict

RECORD_KIND = "sessions"


@dataclass(frozen=True)
class Session:
    """One session's record."""

    session_id: str
    data: dict[str, Any]

    @property
    def image_id(self) -> str:
        return SESSION_PREFIX + self.session_id

    @property
    def owner(self) -> str:
        """Whose quota the session counts against (owner_of at creation)."""
        return str(self.data.get("owner") or f"client:{self.data.get('client_id') or ''}")

    @property
    def expired(self) -> bool:
        return float(self.data.get("expiry_ts", 0)) <= time.time()

    def info(self) -> dict[str, Any]:
        """MONAI Label's session_info, without server paths (path/image name the session instead)."""
        return {
            "name": self.session_id,
            "path": f"sessions/{self.session_id}",
            "image": self.data.get("file_name", ""),
            "meta": self.data.get("meta", {}),
            "create_ts": int(self.data.get("create_ts", 0)),
            "last_access_ts": int(self.data.get("last_access_ts", 0)),
            "expiry": int(self.data.get("expiry", 0)),
        }


def owner_of(ctx: Ctx, client_id: str | None) -> str:
    """Who a new session belongs to, for the per-client quota: the authenticated user when auth
    is on (a client cannot pick another name), else the client_id MONAI Label clients send."""
    if ctx.settings.auth_enabled:
        return f"user:{ctx.identity.username}"
    return f"client:{client_id or ''}"


def new_session_id() -> str:
    return str(uuid.uuid4())


def valid_session_id(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _record_name(session_id: str) -> str:
    return f"records/{RECORD_KIND}/{session_id}"


async def put_record(ctx: Ctx, session: Session) -> None:
    await ctx.clients.datastore.PutRecord(
        ds_pb.PutRecordRequest(name=_record_name(session.session_id), data=to_struct(session.data)),
        timeout=ctx.timeout,
        metadata=ctx.service_metadata,
    )


async def delete_session(ctx: Ctx, session: Session) -> None:
    """Removes the image, then the record; either may already be gone."""
    for call, request in (
        (
            ctx.clients.datastore.DeleteImage,
            ds_pb.DeleteImageRequest(name=f"images/{session.image_id}"),
        ),
        (
            ctx.clients.datastore.DeleteRecord,
            ds_pb.DeleteRecordRequest(name=_record_name(session.session_id)),
        ),
    ):
        try:
            await call(request, timeout=ctx.timeout, metadata=ctx.service_metadata)
        except grpc.aio.AioRpcError as err:
            if err.code() is not grpc.StatusCode.NOT_FOUND:
                raise


async def get_session(ctx: Ctx, session_id: str) -> Session | None:
    """The live session, or None when unknown or expired (an expired one is removed now)."""
    if not valid_session_id(session_id):
        return None
    response = await found_or_none(
        ctx.clients.datastore.GetRecord(
            ds_pb.GetRecordRequest(name=_record_name(session_id)),
            timeout=ctx.timeout,
            metadata=ctx.service_metadata,
        )
    )
    if response is None:
        return None
    session = Session(session_id, struct_to_dict(response.record.data))
    if session.expired:
        await delete_session(ctx, session)
        return None
    return session


async def live_sessions(ctx: Ctx) -> list[Session]:
    """All live sessions (a handful: they expire within the hour); removes expired ones on the way."""
    sessions: list[Session] = []
    token = ""
    while True:
        response = await ctx.clients.datastore.ListRecords(
            ds_pb.ListRecordsRequest(parent=f"records/{RECORD_KIND}", page_size=1000, page_token=token),
            timeout=ctx.timeout,
            metadata=ctx.service_metadata,
        )
        for record in response.records:
            sessions.append(Session(record.record_id, struct_to_dict(record.data)))
        token = response.next_page_token
        if not token:
            break
    live = []
    for session in sessions:
        if session.expired:
            await delete_session(ctx, session)
        else:
            live.append(session)
    return live


def is_session_image(image_id: str, info: dict[str, Any]) -> bool:
    return image_id.startswith(SESSION_PREFIX) and bool(info.get("session"))
