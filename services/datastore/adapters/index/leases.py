"""Next-sample leases: one live lease per image, handed out race-free on both backends."""

from __future__ import annotations

import math
import random
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.errors import (
    InvalidArgument,
)
from services.common.paging import DEFAULT_PAGE_SIZE
from services.common.paging import page_size as _check_page_size
from services.datastore.adapters.index.base import (
    Repository,
    decode_token,
    encode_token,
    lease_not_found,
)
from services.datastore.adapters.index.database import epoch
from services.datastore.domain.model import (
    DEFAULT_TAG_FINAL,
    ImageOrder,
    ImageRecord,
    LeaseRecord,
    Page,
)
from services.datastore.domain.ports import NoLeaseReason, Now


class Leases(Repository):
    def _try_lease(
        self, conn: Connection, image_id: str, client_id: str, strategy: str, tag: str, t: float, expire: float
    ) -> bool:
        """Claims ``image_id`` unless a live lease or a ``tag`` label beat us to it."""
        ls, lb = self._t.leases, self._t.labels
        stmt = self._insert(ls).values(
            image_id=image_id, client_id=client_id, strategy=strategy, acquire_time=t, expire_time=expire
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[ls.c.image_id],
            set_={"client_id": client_id, "strategy": strategy, "acquire_time": t, "expire_time": expire},
            where=ls.c.expire_time <= t,  # only an expired lease may be taken over
        )
        if conn.execute(stmt.returning(ls.c.image_id)).first() is None:
            return False
        # A new statement sees labels committed since the candidate query (READ COMMITTED).
        if conn.execute(sa.select(sa.literal(1)).where((lb.c.image_id == image_id) & (lb.c.tag == tag))).first():
            conn.execute(sa.delete(ls).where(ls.c.image_id == image_id))
            return False
        return True

    def acquire_next_lease(
        self,
        client_id: str,
        strategy: str,
        *,
        order: ImageOrder = ImageOrder.ID,
        score_key: str | None = None,
        tag: str = DEFAULT_TAG_FINAL,
        ttl_seconds: float,
        now: Now = None,
        mark_in_info: bool = False,
    ) -> tuple[ImageRecord, LeaseRecord] | None:
        """Leases the first image by ``order`` that has no ``tag`` label and no live lease.

        The client's previous lease under the same strategy is released first, in the same
        transaction (so under ID order an unlabeled, skipped image comes back to the same
        client, as MONAI Label's ``first`` does). Expired leases do not count and are taken
        over. No image is ever under two live leases: PostgreSQL claims candidates with
        ``FOR UPDATE SKIP LOCKED`` (then, if all were locked, waits on them once more so a
        busy image is not reported as unavailable), SQLite serialises writers.
        ``mark_in_info`` records ``info.strategy[strategy] = {ts, client_id}`` as MONAI Label
        does. Returns None when nothing is available (see ``no_lease_reason``).
        """
        if not client_id:
            raise InvalidArgument("client_id is required to lease an image")
        if not ttl_seconds or ttl_seconds <= 0 or not math.isfinite(ttl_seconds):
            raise InvalidArgument(f"ttl_seconds must be a positive number (got {ttl_seconds})")
        tag = tag or DEFAULT_TAG_FINAL
        t = epoch(now)
        expire = t + ttl_seconds
        segs = self._segments(order, score_key, random.random() if order is ImageOrder.RANDOM else None)
        im, ls = self._t.images, self._t.leases
        base = [self._lacks_label(tag), ~self._has_live_lease(t)]

        def try_one(conn: Connection, image_id: str, mode: str) -> bool:
            if mode != "wait":
                return self._try_lease(conn, image_id, client_id, strategy, tag, t, expire)
            # Lock the image before touching its lease (the order every writer uses, so no
            # deadlock with an acquirer still holding it), inside a savepoint so that a
            # candidate that turns out taken is unlocked again at once.
            sp = conn.begin_nested()
            locked = conn.execute(sa.select(im.c.id).where(im.c.id == image_id).with_for_update()).first()
            if locked is not None and self._try_lease(conn, image_id, client_id, strategy, tag, t, expire):
                sp.commit()
                return True
            sp.rollback()
            return False

        def claim(conn: Connection, mode: str) -> str | None:
            """mode: "skip" (PostgreSQL, skip rows other acquirers hold), "wait" (PostgreSQL,
            wait for them), "plain" (SQLite: the database is already write-locked)."""
            batch = 1 if mode == "skip" else 32
            for seg in segs:
                last: list[Any] | None = None
                while True:
                    q = self._segment_query(seg, base, last, batch, [im.c.id])
                    if mode == "skip":
                        q = q.with_for_update(skip_locked=True, of=im)
                    rows = conn.execute(q).all()
                    for r in rows:
                        if try_one(conn, r.id, mode):
                            return str(r.id)
                    if len(rows) < batch:
                        break
                    last = [getattr(rows[-1], f"k{j}") for j in range(len(seg.cols))]
            return None

        def tx(conn: Connection) -> tuple[ImageRecord, LeaseRecord] | None:
            conn.execute(sa.delete(ls).where((ls.c.client_id == client_id) & (ls.c.strategy == strategy)))
            image_id = (claim(conn, "skip") or claim(conn, "wait")) if self._pg else claim(conn, "plain")
            if image_id is None:
                return None
            if mark_in_info:
                row = self._require_image_row(conn, image_id, lock=True)
                info = dict(row.info or {})
                prev = info.get("strategy")
                marks: dict[str, Any] = prev if isinstance(prev, dict) else {}
                info["strategy"] = {**marks, strategy: {"ts": int(t), "client_id": client_id}}
                conn.execute(
                    sa.update(im).where(im.c.id == image_id).values(info=info, revision=row.revision + 1, update_time=t)
                )
                self._changed(conn, [image_id])
            lease = self._lease_record(conn.execute(sa.select(ls).where(ls.c.image_id == image_id)).one())
            return self._load_image(conn, image_id), lease

        return self._write(tx, "acquire_next_lease")

    def no_lease_reason(self, tag: str = DEFAULT_TAG_FINAL, *, now: Now = None) -> NoLeaseReason:
        """Why ``acquire_next_lease`` found nothing (the proto's NoImageReason)."""
        im = self._t.images

        def tx(conn: Connection) -> NoLeaseReason:
            if conn.execute(sa.select(im.c.id).limit(1)).first() is None:
                return "EMPTY"
            unlabeled = sa.select(im.c.id).where(self._lacks_label(tag or DEFAULT_TAG_FINAL)).limit(1)
            if conn.execute(unlabeled).first() is None:
                return "ALL_LABELED"
            return "ALL_LEASED"

        return self._read(tx, "no_lease_reason")

    def renew_lease(self, image_id: str, client_id: str, ttl_seconds: float, *, now: Now = None) -> LeaseRecord:
        """Extends the client's live lease to now + ttl. An expired lease is NOT_FOUND
        (LEASE_NOT_FOUND) even if nobody took it over yet: once expired, the image was
        offered to others, so the client must acquire again rather than assume exclusivity."""
        if not ttl_seconds or ttl_seconds <= 0 or not math.isfinite(ttl_seconds):
            raise InvalidArgument(f"ttl_seconds must be a positive number (got {ttl_seconds})")
        t = epoch(now)
        ls = self._t.leases
        key = (ls.c.image_id == image_id) & (ls.c.client_id == client_id)

        def tx(conn: Connection) -> LeaseRecord:
            live = key & (ls.c.expire_time > t)
            if conn.execute(sa.update(ls).where(live).values(expire_time=t + ttl_seconds)).rowcount != 1:
                raise lease_not_found(image_id, client_id)
            return self._lease_record(conn.execute(sa.select(ls).where(key)).one())

        return self._write(tx, "renew_lease")

    def release_lease(self, image_id: str, client_id: str, *, now: Now = None) -> None:
        """NOT_FOUND (LEASE_NOT_FOUND) if that client holds no live lease on the image
        (an expired one is left for ``acquire_next_lease`` / ``expire_leases`` to reuse)."""
        t = epoch(now)
        ls = self._t.leases

        def tx(conn: Connection) -> None:
            key = (ls.c.image_id == image_id) & (ls.c.client_id == client_id) & (ls.c.expire_time > t)
            if conn.execute(sa.delete(ls).where(key)).rowcount != 1:
                raise lease_not_found(image_id, client_id)

        self._write(tx, "release_lease")

    def list_leases(
        self,
        client_id: str | None = None,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        now: Now = None,
    ) -> Page[LeaseRecord]:
        """Live leases (of one client, or all), by image id."""
        size = _check_page_size(page_size)
        tok = decode_token(page_token, "leases")
        after = tok.get("i") if tok else None
        if tok is not None and (not isinstance(after, str) or tok.get("c") != (client_id or "")):
            raise InvalidArgument("invalid page_token")
        t = epoch(now)
        ls = self._t.leases
        where = [ls.c.expire_time > t]
        if client_id:
            where.append(ls.c.client_id == client_id)

        def tx(conn: Connection) -> Page[LeaseRecord]:
            total = conn.execute(sa.select(sa.func.count()).select_from(ls).where(*where)).scalar_one()
            q = sa.select(ls).where(*where)
            if after is not None:
                q = q.where(ls.c.image_id > after)
            rows = conn.execute(q.order_by(ls.c.image_id).limit(size + 1)).all()
            token = ""
            if len(rows) > size:
                rows = rows[:size]
                token = encode_token("leases", {"c": client_id or "", "i": rows[-1].image_id})
            return Page(items=[self._lease_record(r) for r in rows], next_page_token=token, total_size=total)

        return self._read(tx, "list_leases")

    def expire_leases(self, now: Now = None) -> int:
        """Deletes leases that expired by ``now``; returns how many. Optional housekeeping:
        expired leases are already ignored (and taken over) by ``acquire_next_lease``."""
        t = epoch(now)
        ls = self._t.leases
        return self._write(
            lambda conn: conn.execute(sa.delete(ls).where(ls.c.expire_time <= t)).rowcount, "expire_leases"
        )
