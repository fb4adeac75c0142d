"""Small JSON records (job history, sessions) with optimistic revisions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.errors import (
    Aborted,
    InvalidArgument,
)
from services.common.paging import DEFAULT_PAGE_SIZE
from services.common.paging import page_size as _check_page_size
from services.datastore.adapters.index.base import (
    Repository,
    check_json,
    check_revision,
    decode_token,
    encode_token,
    record_not_found,
)
from services.datastore.adapters.index.database import epoch
from services.datastore.domain.model import (
    Page,
    Record,
)
from services.datastore.domain.ports import Now


class Records(Repository):
    def put_record(
        self,
        kind: str,
        record_id: str,
        data: Mapping[str, Any],
        expected_revision: int | None = None,
        *,
        now: Now = None,
    ) -> Record:
        """Creates or replaces a record. ``expected_revision``: None/0 = unconditional,
        -1 = only if it does not exist yet (ABORTED if it does), N > 0 = only if still at N
        (ABORTED if not, NOT_FOUND if the record is gone)."""
        data_ = check_json(data, "record data")
        t = epoch(now)
        rc = self._t.records
        key = (rc.c.kind == kind) & (rc.c.id == record_id)

        def tx(conn: Connection) -> Record:
            created = False
            if expected_revision is None or expected_revision <= 0:
                created = self._insert_ignore(
                    conn,
                    rc,
                    {"kind": kind, "id": record_id, "data": data_, "revision": 1, "create_time": t, "update_time": t},
                )
            if not created:
                old = conn.execute(sa.select(rc.c.revision).where(key).with_for_update()).first()
                if old is None:
                    raise record_not_found(kind, record_id)
                if expected_revision == -1:
                    raise Aborted(f"record {kind!r}/{record_id!r} already exists")
                check_revision(
                    expected_revision if (expected_revision or 0) > 0 else None,
                    old.revision,
                    f"record {kind!r}/{record_id!r}",
                )
                conn.execute(sa.update(rc).where(key).values(data=data_, revision=old.revision + 1, update_time=t))
            return self._record(conn.execute(sa.select(rc).where(key)).one())

        return self._write(tx, "put_record")

    def get_record(self, kind: str, record_id: str) -> Record:
        rc = self._t.records

        def tx(conn: Connection) -> Record:
            row = conn.execute(sa.select(rc).where((rc.c.kind == kind) & (rc.c.id == record_id))).first()
            if row is None:
                raise record_not_found(kind, record_id)
            return self._record(row)

        return self._read(tx, "get_record")

    def list_records(self, kind: str, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "") -> Page[Record]:
        """Records of a kind by id (plain string order)."""
        size = _check_page_size(page_size)
        tok = decode_token(page_token, "records")
        after = tok.get("i") if tok else None
        if tok is not None and (not isinstance(after, str) or tok.get("n") != kind):
            raise InvalidArgument("invalid page_token")
        rc = self._t.records

        def tx(conn: Connection) -> Page[Record]:
            total = conn.execute(sa.select(sa.func.count()).select_from(rc).where(rc.c.kind == kind)).scalar_one()
            q = sa.select(rc).where(rc.c.kind == kind)
            if after is not None:
                q = q.where(rc.c.id > after)
            rows = conn.execute(q.order_by(rc.c.id).limit(size + 1)).all()
            token = ""
            if len(rows) > size:
                rows = rows[:size]
                token = encode_token("records", {"n": kind, "i": rows[-1].id})
            return Page(items=[self._record(r) for r in rows], next_page_token=token, total_size=total)

        return self._read(tx, "list_records")

    def delete_record(self, kind: str, record_id: str, expected_revision: int | None = None) -> Record:
        """Deletes a record; with ``expected_revision`` N > 0 only if it is still at N (ABORTED
        if not, as put_record's; NOT_FOUND if it is gone)."""
        rc = self._t.records
        key = (rc.c.kind == kind) & (rc.c.id == record_id)

        def tx(conn: Connection) -> Record:
            row = conn.execute(sa.select(rc).where(key).with_for_update()).first()
            if row is None:
                raise record_not_found(kind, record_id)
            check_revision(
                expected_revision if (expected_revision or 0) > 0 else None,
                row.revision,
                f"record {kind!r}/{record_id!r}",
            )
            conn.execute(sa.delete(rc).where(key))
            return self._record(row)

        return self._write(tx, "delete_record")
