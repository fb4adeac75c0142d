"""MONAI Label's sessions: one row per uploaded volume, live until ``expire_time``.

Every read takes ``now`` and treats a row whose ``expire_time`` has passed as gone, so a
session is invisible the moment it expires; the purge (``expired_sessions`` then
``remove_expired_session``) deletes such rows later, after their blobs. The caps (live
sessions per owner and in all) are checked and the row inserted in one write transaction
(SQLite: the one writer; PostgreSQL: under an advisory lock, since READ COMMITTED counts
would let concurrent creates overshoot).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from services.common.errors import AlreadyExists, NotFound, ResourceExhausted
from services.datastore.adapters.index.base import Repository, check_json
from services.datastore.adapters.index.database import epoch, to_datetime
from services.datastore.domain.model import SessionRecord
from services.datastore.domain.ports import Now

_PG_LOCK = 7426134  # serialises session creates across replicas (migrate.py uses 7426133)


def session_not_found(session_id: str) -> NotFound:
    return NotFound(f"session {session_id!r} does not exist or has expired")


class Sessions(Repository):
    @staticmethod
    def _session(r: Row[Any]) -> SessionRecord:
        return SessionRecord(
            session_id=r.id,
            owner=r.owner,
            file_name=r.file_name,
            ext=r.ext,
            sha256=r.sha256,
            size=r.size,
            meta=dict(r.meta or {}),
            expiry_seconds=int(r.expiry_seconds),
            create_time=to_datetime(r.create_time),
            last_access_time=to_datetime(r.last_access_time),
            expire_time=to_datetime(r.expire_time),
        )

    def create_session(
        self,
        session_id: str,
        *,
        owner: str,
        file_name: str,
        ext: str,
        sha256: str,
        size: int,
        meta: Mapping[str, Any],
        expiry_seconds: int,
        per_owner: int,
        total: int,
        now: Now = None,
    ) -> SessionRecord:
        """Inserts a session unless the owner already holds ``per_owner`` live sessions or all
        owners together ``total`` (RESOURCE_EXHAUSTED), atomically with the count."""
        meta_ = check_json(meta, "session meta")
        t = epoch(now)
        st = self._t.sessions

        def tx(conn: Connection) -> SessionRecord:
            if self._pg:
                conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({_PG_LOCK})"))
            live = st.c.expire_time > t
            count = conn.execute(sa.select(sa.func.count()).select_from(st).where(live)).scalar_one()
            if count >= total:
                raise ResourceExhausted(
                    f"too many sessions: {count} are live, the limit is {total}; retry once some end or expire"
                )
            held = conn.execute(
                sa.select(sa.func.count()).select_from(st).where(live & (st.c.owner == owner))
            ).scalar_one()
            if held >= per_owner:
                raise ResourceExhausted(
                    f"too many sessions for this client: it holds {held}, the limit is {per_owner}; "
                    "delete one (DELETE /session/{id}) or wait until one expires"
                )
            row = {
                "id": session_id,
                "owner": owner,
                "file_name": file_name,
                "ext": ext,
                "sha256": sha256,
                "size": size,
                "meta": meta_,
                "expiry_seconds": expiry_seconds,
                "create_time": t,
                "last_access_time": t,
                "expire_time": t + expiry_seconds,
            }
            if not self._insert_ignore(conn, st, row):
                raise AlreadyExists(f"session {session_id!r} already exists")
            return self._session(conn.execute(sa.select(st).where(st.c.id == session_id)).one())

        return self._write(tx, "create_session")

    def _live_row(self, conn: Connection, session_id: str, t: float, *, for_update: bool = False) -> Any:
        """The row of a session live at `t`; NOT_FOUND when unknown or expired."""
        st = self._t.sessions
        query = sa.select(st).where((st.c.id == session_id) & (st.c.expire_time > t))
        row = conn.execute(query.with_for_update() if for_update else query).first()
        if row is None:
            raise session_not_found(session_id)
        return row

    def get_session(self, session_id: str, *, now: Now = None) -> SessionRecord:
        """The live session; NOT_FOUND when unknown or expired."""
        t = epoch(now)

        def tx(conn: Connection) -> SessionRecord:
            return self._session(self._live_row(conn, session_id, t))

        return self._read(tx, "get_session")

    def touch_session(self, session_id: str, *, now: Now = None) -> SessionRecord:
        """Records an access to a live session: its expiry moves to now + its lifetime."""
        t = epoch(now)
        st = self._t.sessions

        def tx(conn: Connection) -> SessionRecord:
            row = self._live_row(conn, session_id, t, for_update=True)
            conn.execute(
                sa.update(st)
                .where(st.c.id == session_id)
                .values(last_access_time=t, expire_time=t + row.expiry_seconds)
            )
            return self._session(conn.execute(sa.select(st).where(st.c.id == session_id)).one())

        return self._write(tx, "touch_session")

    def delete_session(self, session_id: str, *, now: Now = None) -> SessionRecord:
        """Removes a live session's row and returns it; NOT_FOUND when unknown or expired."""
        t = epoch(now)
        st = self._t.sessions

        def tx(conn: Connection) -> SessionRecord:
            row = self._live_row(conn, session_id, t, for_update=True)
            conn.execute(sa.delete(st).where(st.c.id == session_id))
            return self._session(row)

        return self._write(tx, "delete_session")

    def expired_sessions(self, *, now: Now = None, limit: int = 1000) -> list[SessionRecord]:
        """Up to ``limit`` rows whose session has expired, oldest expiry first."""
        t = epoch(now)
        st = self._t.sessions

        def tx(conn: Connection) -> list[SessionRecord]:
            q = sa.select(st).where(st.c.expire_time <= t).order_by(st.c.expire_time, st.c.id).limit(limit)
            return [self._session(r) for r in conn.execute(q)]

        return self._read(tx, "expired_sessions")

    def remove_expired_session(self, session_id: str, *, now: Now = None) -> bool:
        """Deletes the row if its session has expired by ``now`` (a live one is kept)."""
        t = epoch(now)
        st = self._t.sessions

        def tx(conn: Connection) -> bool:
            gone = conn.execute(
                sa.delete(st).where((st.c.id == session_id) & (st.c.expire_time <= t)).returning(st.c.id)
            ).first()
            return gone is not None

        return self._write(tx, "remove_expired_session")

    def session_ids(self) -> set[str]:
        """Every row's id, live or expired (the start-up sweep of blobs without a row)."""
        st = self._t.sessions
        return self._read(lambda conn: set(conn.execute(sa.select(st.c.id)).scalars()), "session_ids")
