"""What the index's repositories share: row -> record conversion, the image filters and
keyset segments, page tokens, JSON checks and the NOT_FOUND errors.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from services.common.errors import (
    Aborted,
    InvalidArgument,
    NotFound,
)
from services.datastore.adapters.index.database import Database, to_datetime
from services.datastore.domain.model import (
    DEFAULT_TAG_FINAL,
    ImageOrder,
    ImageRecord,
    LabelRecord,
    LeaseRecord,
    ModelRecord,
    ModelVersionRecord,
    Record,
)


def check_json(value: Any, what: str) -> dict[str, Any]:
    """Refuse what would not round-trip through both backends (NaN, non-JSON types)."""
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{what} must be a JSON object")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{what} is not valid JSON: {e}") from None


def encode_token(kind: str, payload: dict[str, Any]) -> str:
    raw = json.dumps({"k": kind, **payload}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, kind: str) -> dict[str, Any] | None:
    """Opaque keyset token -> payload; anything not made by us for this listing is INVALID."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidArgument("invalid page_token") from None
    if not isinstance(data, dict) or data.get("k") != kind:
        raise InvalidArgument("invalid page_token: it was not issued for this listing")
    return data


def image_not_found(image_id: str) -> NotFound:
    return NotFound(f"image {image_id!r} not found", reason="IMAGE_NOT_FOUND")


def label_not_found(image_id: str, tag: str) -> NotFound:
    return NotFound(f"label {tag!r} of image {image_id!r} not found", reason="LABEL_NOT_FOUND")


def model_not_found(name: str) -> NotFound:
    return NotFound(f"model {name!r} not found", reason="MODEL_NOT_FOUND")


def version_not_found(name: str, version: str) -> NotFound:
    return NotFound(f"model version {name!r}/{version!r} not found", reason="MODEL_NOT_FOUND")


def record_not_found(kind: str, record_id: str) -> NotFound:
    return NotFound(f"record {kind!r}/{record_id!r} not found", reason="RECORD_NOT_FOUND")


def lease_not_found(image_id: str, client_id: str) -> NotFound:
    return NotFound(f"client {client_id!r} holds no lease on image {image_id!r}", reason="LEASE_NOT_FOUND")


def check_revision(expected: int | None, actual: int, what: str) -> None:
    if expected and expected != actual:
        raise Aborted(f"{what} is at revision {actual}, not {expected}; re-read and retry")


_PG_LOG_CHANGES = sa.text(
    "INSERT INTO image_changes (image_id, seq) "
    "SELECT i, CAST(CAST(pg_current_xact_id() AS text) AS bigint) FROM unnest(CAST(:ids AS text[])) AS i "
    "ON CONFLICT (image_id) DO UPDATE SET seq = excluded.seq"
)
"""``Repository._changed`` on PostgreSQL: each image numbered by this transaction's id, no
shared row locked (readers stop at the oldest transaction still running: export.py)."""

LOG_MAX_IMAGES = 10_000
"""A write changing more images than this (a large reindex) is not logged per image: it asks
the readers of the change log to rebuild MONAI Label's JSON whole (cheaper than patching)."""


@dataclass(frozen=True)
class _Segment:
    """One ordered run of a listing: its own filter and sort columns (desc flag each).

    SCORE_DESC is "scored images by value" then "unscored by id"; RANDOM is "rand >= r0"
    then "rand < r0". Each run is one index range scan with a keyset bound.
    """

    where: tuple[sa.ColumnElement[bool], ...]
    cols: tuple[tuple[sa.ColumnElement[Any], bool], ...]
    join_score_key: str | None = None


def _after(cols: Sequence[tuple[sa.ColumnElement[Any], bool]], last: Sequence[Any]) -> sa.ColumnElement[bool]:
    """Keyset bound "strictly after ``last``" for mixed sort directions.

    Written as ``c1 >= v1 AND (c1 > v1 OR (c1 = v1 AND c2 > v2) …)`` so that the first
    column gives the planner a plain range bound on the index.
    """
    ors: list[sa.ColumnElement[bool]] = []
    for i, (col, desc) in enumerate(cols):
        eqs = [cols[j][0] == last[j] for j in range(i)]
        ors.append(sa.and_(*eqs, col < last[i] if desc else col > last[i]))
    first, first_desc = cols[0]
    bound = first <= last[0] if first_desc else first >= last[0]
    return sa.and_(bound, sa.or_(*ors))


def keys_fit(cols: Sequence[tuple[sa.ColumnElement[Any], bool]], last: Sequence[Any]) -> bool:
    """A token's sort key has the right arity and types (a forged one must not reach SQL)."""
    if len(last) != len(cols):
        return False
    for (col, _), v in zip(cols, last, strict=True):
        if isinstance(col.type, sa.Double):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return False
        elif not isinstance(v, str):
            return False
    return True


class Repository:
    """One topic's queries over the shared ``Database``; the helpers every topic needs
    (row -> record, the image filters and keyset segments) live here once."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._t = db.t
        self._pg = db.pg
        self._insert = db.insert
        self._write = db.write
        self._read = db.read
        self._cached = db.cached
        self._peek = db.peek
        self._insert_ignore = db.insert_ignore

    # ------------------------------------------------------------------ row -> record

    @staticmethod
    def _label_record(r: Row[Any]) -> LabelRecord:
        return LabelRecord(
            image_id=r.image_id,
            tag=r.tag,
            ext=r.ext,
            sha256=r.sha256,
            size=r.size,
            info=dict(r.info or {}),
            revision=r.revision,
            create_time=to_datetime(r.create_time),
            update_time=to_datetime(r.update_time),
        )

    def _images_from_rows(self, conn: Connection, rows: Sequence[Row[Any]]) -> list[ImageRecord]:
        """Attaches labels and scores to image rows with two batched queries."""
        if not rows:
            return []
        ids = [r.id for r in rows]
        t = self._t
        labels: dict[str, dict[str, LabelRecord]] = {i: {} for i in ids}
        for lr in conn.execute(
            sa.select(t.labels).where(t.labels.c.image_id.in_(ids)).order_by(t.labels.c.image_id, t.labels.c.tag)
        ):
            labels[lr.image_id][lr.tag] = self._label_record(lr)
        scores: dict[str, dict[str, float]] = {i: {} for i in ids}
        for sr in conn.execute(
            sa.select(t.scores.c.image_id, t.scores.c.key, t.scores.c.value)
            .where(t.scores.c.image_id.in_(ids))
            .order_by(t.scores.c.image_id, t.scores.c.key)
        ):
            scores[sr.image_id][sr.key] = sr.value
        return [
            ImageRecord(
                image_id=r.id,
                ext=r.ext,
                sha256=r.sha256,
                size=r.size,
                info=dict(r.info or {}),
                revision=r.revision,
                create_time=to_datetime(r.create_time),
                update_time=to_datetime(r.update_time),
                labels=labels[r.id],
                scores=scores[r.id],
            )
            for r in rows
        ]

    def _image_row(self, conn: Connection, image_id: str, *, lock: bool = False) -> Row[Any] | None:
        q = sa.select(self._t.images).where(self._t.images.c.id == image_id)
        if lock:
            q = q.with_for_update()
        return conn.execute(q).first()

    def _lock_images(self, conn: Connection, image_ids: Iterable[str]) -> None:
        """Locks these images' rows (those that exist) in id order, first thing in a write of
        several images: every writer touching an image's labels or lease locks the image
        first, so a bulk writer that did not (and then, say, updated ``images.final``) would
        deadlock with a label save holding the image and waiting on the label. SQLite
        serialises writes already."""
        if not self._pg:
            return
        im = self._t.images
        ids = sorted(set(image_ids))
        for i in range(0, len(ids), 500):
            q = sa.select(im.c.id).where(im.c.id.in_(ids[i : i + 500])).order_by(im.c.id).with_for_update()
            conn.execute(q).all()

    def _require_image_row(self, conn: Connection, image_id: str, *, lock: bool = False) -> Row[Any]:
        row = self._image_row(conn, image_id, lock=lock)
        if row is None:
            raise image_not_found(image_id)
        return row

    def _load_image(self, conn: Connection, image_id: str) -> ImageRecord:
        return self._images_from_rows(conn, [self._require_image_row(conn, image_id)])[0]

    def _label_row(self, conn: Connection, image_id: str, tag: str, *, lock: bool = False) -> Row[Any]:
        labels = self._t.labels
        q = sa.select(labels).where((labels.c.image_id == image_id) & (labels.c.tag == tag))
        if lock:
            q = q.with_for_update()
        row = conn.execute(q).first()
        if row is None:
            raise label_not_found(image_id, tag)
        return row

    # ------------------------------------------------------------------ change log

    def _next_change_seq(self, conn: Connection, *, reset: bool = False) -> int:
        """Takes the next change number (change_log's row stays locked until this
        transaction ends, so numbers commit in order); with ``reset``, also asks every reader
        of the log to rebuild whole."""
        cl = self._t.change_log
        values: dict[str, Any] = {"seq": cl.c.seq + 1}
        if reset:
            values["reset_seq"] = cl.c.seq + 1
        seq = conn.execute(sa.update(cl).where(cl.c.id == 1).values(**values).returning(cl.c.seq)).scalar()
        if seq is None:
            # The migration inserts the row; if it went missing, start again from a number no
            # reader kept (the clock's nanoseconds), as a reset: every reader rebuilds whole.
            seq = time.time_ns()
            conn.execute(sa.insert(cl).values(id=1, seq=seq, reset_seq=seq))
        return int(seq)

    def _changed(self, conn: Connection, image_ids: Iterable[str]) -> None:
        """Records, in this write transaction, that these images' entries in MONAI Label's
        datastore JSON may have changed (adapters/index/export.py patches them). Above
        ``LOG_MAX_IMAGES`` images the readers are told to rebuild whole instead (change_log's
        row, locked until commit). SQLite (one writer at a time): numbered from change_log's
        row; call it after the transaction's other writes. PostgreSQL: numbered by this
        transaction's id, so concurrent writers do not wait on each other's commits."""
        ids = sorted(set(image_ids))
        if not ids:
            return
        if len(ids) > LOG_MAX_IMAGES:
            self._next_change_seq(conn, reset=True)
            return
        if self._pg:
            for i in range(0, len(ids), 500):
                conn.execute(_PG_LOG_CHANGES, {"ids": ids[i : i + 500]})
            return
        seq = self._next_change_seq(conn)
        ic = self._t.image_changes
        stmt = self._insert(ic)
        stmt = stmt.on_conflict_do_update(index_elements=[ic.c.image_id], set_={"seq": stmt.excluded.seq})
        for i in range(0, len(ids), 500):
            rows = [{"image_id": image_id, "seq": seq} for image_id in ids[i : i + 500]]
            conn.execute(stmt, rows if len(rows) > 1 else rows[0])  # one row: no executemany round

    def _changed_all(self, conn: Connection) -> None:
        """Every entry may have changed (clear): readers of the log rebuild whole."""
        self._next_change_seq(conn, reset=True)
        conn.execute(sa.delete(self._t.image_changes))  # the tombstones are not needed any more

    # ------------------------------------------------------------------ filters

    def _label_exists(self, tag: str) -> sa.Exists:
        lb = self._t.labels
        return sa.exists().where((lb.c.tag == tag) & (lb.c.image_id == self._t.images.c.id))

    def _has_label(self, tag: str) -> sa.ColumnElement[bool]:
        if tag == DEFAULT_TAG_FINAL:
            return self._t.images.c.final == sa.true()
        return self._label_exists(tag)

    def _lacks_label(self, tag: str) -> sa.ColumnElement[bool]:
        if tag == DEFAULT_TAG_FINAL:
            return self._t.images.c.final == sa.false()
        return ~self._label_exists(tag)

    def _sync_final(self, conn: Connection, image_ids: Iterable[str]) -> None:
        """Recomputes ``images.final`` for these images after their labels changed."""
        im = self._t.images
        ids = sorted(set(image_ids))
        for i in range(0, len(ids), 500):
            conn.execute(
                sa.update(im).where(im.c.id.in_(ids[i : i + 500])).values(final=self._label_exists(DEFAULT_TAG_FINAL))
            )

    def _has_live_lease(self, t: float) -> sa.ColumnElement[bool]:
        ls = self._t.leases
        return sa.exists().where((ls.c.image_id == self._t.images.c.id) & (ls.c.expire_time > t))

    def _segments(self, order: ImageOrder, score_key: str | None, r0: float | None) -> list[_Segment]:
        im, sc = self._t.images, self._t.scores
        if order is ImageOrder.ID:
            return [_Segment(where=(), cols=((im.c.id, False),))]
        if order is ImageOrder.SCORE_DESC:
            if not score_key:
                raise InvalidArgument("score_key is required to order by score")
            no_score = ~sa.exists().where((sc.c.image_id == im.c.id) & (sc.c.key == score_key))
            return [
                _Segment(where=(), cols=((sc.c.value, True), (sc.c.image_id, False)), join_score_key=score_key),
                _Segment(where=(no_score,), cols=((im.c.id, False),)),
            ]
        if order is ImageOrder.RANDOM:
            assert r0 is not None
            cols = ((im.c.rand, False), (im.c.id, False))
            return [_Segment(where=(im.c.rand >= r0,), cols=cols), _Segment(where=(im.c.rand < r0,), cols=cols)]
        raise InvalidArgument(f"unknown image order {order!r}")

    def _segment_query(
        self,
        seg: _Segment,
        base: Sequence[sa.ColumnElement[bool]],
        last: Sequence[Any] | None,
        limit: int,
        columns: Sequence[sa.ColumnElement[Any]],
    ) -> sa.Select[Any]:
        im, sc = self._t.images, self._t.scores
        q = sa.select(*columns, *(c.label(f"k{i}") for i, (c, _) in enumerate(seg.cols)))
        if seg.join_score_key is not None:
            q = q.select_from(im.join(sc, (sc.c.image_id == im.c.id) & (sc.c.key == seg.join_score_key)))
        q = q.where(*base, *seg.where)
        if last is not None:
            q = q.where(_after(seg.cols, last))
        return q.order_by(*(c.desc() if d else c.asc() for c, d in seg.cols)).limit(limit)

    def _hidden(self, id_prefix: str, info_key: str) -> sa.ColumnElement[bool] | None:
        """Images left out of listings and counts: id starts with ``id_prefix`` and info has
        ``info_key`` set to JSON true (the gateway's session images). None: nothing hidden."""
        if not id_prefix or not info_key:
            return None
        im = self._t.images
        starts = sa.func.substr(im.c.id, 1, len(id_prefix)) == id_prefix
        if self._pg:
            flag = sa.and_(
                sa.func.json_typeof(im.c.info.op("->")(info_key)) == "boolean",
                im.c.info.op("->>")(info_key) == "true",
            )
        else:
            flag = sa.func.json_type(im.c.info, "$." + json.dumps(info_key)) == "true"
        return sa.and_(starts, sa.func.coalesce(flag, sa.false()))  # a missing key is NULL

    # ------------------------------------------------------------------ records

    @staticmethod
    def _lease_record(r: Row[Any]) -> LeaseRecord:
        return LeaseRecord(
            image_id=r.image_id,
            client_id=r.client_id,
            strategy=r.strategy,
            acquire_time=to_datetime(r.acquire_time),
            expire_time=to_datetime(r.expire_time),
        )

    @staticmethod
    def _version_record(r: Row[Any]) -> ModelVersionRecord:
        return ModelVersionRecord(
            model=r.name,
            version=r.version,
            file_name=r.file_name,
            sha256=r.sha256,
            size=r.size,
            metrics=dict(r.metrics or {}),
            info=dict(r.info or {}),
            create_time=to_datetime(r.create_time),
        )

    def _latest_version_expr(self) -> sa.ScalarSelect[Any]:
        mv, m = self._t.model_versions, self._t.models
        return (
            sa.select(mv.c.version)
            .where(mv.c.name == m.c.name)
            .order_by(mv.c.seq.desc())
            .limit(1)
            .correlate(m)
            .scalar_subquery()
        )

    def _model_record(self, conn: Connection, name: str, *, lock: bool = False) -> ModelRecord:
        m = self._t.models
        q = sa.select(m.c.name, m.c.pinned_version).where(m.c.name == name)
        if lock:
            q = q.with_for_update()
        row = conn.execute(q).first()
        if row is None:
            raise model_not_found(name)
        latest = conn.execute(sa.select(self._latest_version_expr()).select_from(m).where(m.c.name == name)).scalar()
        return ModelRecord(model=name, latest_version=latest, pinned_version=row.pinned_version)

    def _version_row(self, conn: Connection, name: str, version: str) -> Row[Any]:
        mv = self._t.model_versions
        row = conn.execute(sa.select(mv).where((mv.c.name == name) & (mv.c.version == version))).first()
        if row is None:
            raise version_not_found(name, version)
        return row

    @staticmethod
    def _record(r: Row[Any]) -> Record:
        return Record(
            kind=r.kind,
            record_id=r.id,
            data=dict(r.data or {}),
            revision=r.revision,
            create_time=to_datetime(r.create_time),
            update_time=to_datetime(r.update_time),
        )
