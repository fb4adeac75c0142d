"""The datastore's SQL index: every piece of metadata, behind one small synchronous API.

Blobs live in the object store; this index holds what must be queried and updated
transactionally: image and label facts and info, scores, next-sample leases, model
versions and small JSON records. It runs on SQLite (embedded default, one file) or on
PostgreSQL (several datastore replicas share it), through SQLAlchemy 2 Core.

How writes stay correct under concurrency:

- SQLite: WAL (readers never block the writer), ``busy_timeout`` and every write
  transaction opened with ``BEGIN IMMEDIATE``, so a read-modify-write never races another
  writer and never dies on "database is locked" half-way; inside one process writers
  also queue on a lock, which is fairer than SQLite's sleep-and-retry busy handler.
- PostgreSQL: READ COMMITTED write transactions that lock the row they modify
  (``SELECT … FOR UPDATE``), ``INSERT … ON CONFLICT`` for creates that may race, and
  ``FOR UPDATE SKIP LOCKED`` to hand out leases; multi-statement reads run in
  REPEATABLE READ so a page and its count come from one snapshot. Deadlocks and
  serialization failures are retried.

Every method is thread-safe (one pooled connection per call) and returns the plain
types of ``services.datastore.domain.model``; driver errors surface as ``StorageError``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, Row, make_url

from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LabelgridError,
    NotFound,
    StorageError,
)
from services.common.paging import DEFAULT_PAGE_SIZE
from services.common.paging import page_size as _check_page_size
from services.datastore.domain.model import (
    DEFAULT_TAG_FINAL,
    DatastoreStatus,
    ImageFilter,
    ImageImport,
    ImageOrder,
    ImageRecord,
    LabelImport,
    LabelRecord,
    LeaseRecord,
    ModelRecord,
    ModelVersionRecord,
    Page,
    Record,
)

_log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: images.final
_KEY_LEN = 200  # ids.MAX_ID_LENGTH
_T = TypeVar("_T")
Now = datetime | float | None
NoLeaseReason = Literal["EMPTY", "ALL_LABELED", "ALL_LEASED"]


# --------------------------------------------------------------------------- schema


def _key_type() -> sa.types.TypeEngine[str]:
    """Ids sort in plain byte order (Python's order, MONAI Label's ``first``) on both backends."""
    return sa.String(_KEY_LEN).with_variant(sa.String(_KEY_LEN, collation="C"), "postgresql")


def _json_type() -> sa.types.TypeEngine[Any]:
    # Plain JSON (not JSONB) on PostgreSQL: nothing queries inside it, and JSON keeps the
    # key order MONAI Label wrote, which datastore_v2.json readers see.
    return sa.JSON()


class _Schema:
    """The tables; built per index instance (no module-level metadata registry)."""

    def __init__(self) -> None:
        md = self.metadata = sa.MetaData()
        C = sa.Column
        self.meta = sa.Table(
            "labelgrid_meta",
            md,
            C("key", _key_type(), primary_key=True),
            C("value", sa.String(200), nullable=False),
        )
        self.images = sa.Table(
            "images",
            md,
            C("id", _key_type(), primary_key=True),
            C("ext", sa.String(64), nullable=False),
            C("sha256", sa.String(64), nullable=False),
            C("size", sa.BigInteger, nullable=False),
            C("info", _json_type(), nullable=False),
            C("revision", sa.BigInteger, nullable=False),
            # Uniform random sort key: RANDOM order starts at a random point of this index
            # and wraps around, instead of ORDER BY random() over the whole table.
            C("rand", sa.Double, nullable=False),
            # Denormalised "has a final label": the hot queries (unlabeled images by id or
            # at random, next lease, status) become index range scans instead of anti-joins
            # that walk past every labeled image. Kept in step by every label write.
            C("final", sa.Boolean, nullable=False, server_default=sa.false()),
            C("create_time", sa.Double, nullable=False),
            C("update_time", sa.Double, nullable=False),
        )
        sa.Index("ix_images_rand", self.images.c.rand, self.images.c.id)
        sa.Index("ix_images_final_id", self.images.c.final, self.images.c.id)
        sa.Index("ix_images_final_rand", self.images.c.final, self.images.c.rand, self.images.c.id)
        self.labels = sa.Table(
            "labels",
            md,
            C("image_id", _key_type(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
            C("tag", _key_type(), primary_key=True),
            C("ext", sa.String(64), nullable=False),
            C("sha256", sa.String(64), nullable=False),
            C("size", sa.BigInteger, nullable=False),
            C("info", _json_type(), nullable=False),
            C("revision", sa.BigInteger, nullable=False),
            C("create_time", sa.Double, nullable=False),
            C("update_time", sa.Double, nullable=False),
        )
        sa.Index("ix_labels_tag_image", self.labels.c.tag, self.labels.c.image_id)
        self.scores = sa.Table(
            "scores",
            md,
            C("image_id", _key_type(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
            C("key", _key_type(), primary_key=True),
            C("value", sa.Double, nullable=False),
            C("model_version", sa.Text, nullable=False),
            C("time", sa.Double, nullable=False),
        )
        # Serves "highest score first, ties by id" as one index range scan.
        sa.Index("ix_scores_key_value", self.scores.c.key, self.scores.c.value.desc(), self.scores.c.image_id)
        self.leases = sa.Table(
            "leases",
            md,
            C("image_id", _key_type(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
            C("client_id", sa.Text, nullable=False),
            C("strategy", sa.Text, nullable=False),
            C("acquire_time", sa.Double, nullable=False),
            C("expire_time", sa.Double, nullable=False),
        )
        sa.Index("ix_leases_expire", self.leases.c.expire_time)
        sa.Index("ix_leases_client", self.leases.c.client_id, self.leases.c.strategy)
        self.models = sa.Table(
            "models",
            md,
            C("name", _key_type(), primary_key=True),
            C("pinned_version", _key_type(), nullable=True),
            # Highest sequence number handed out; never decreases, so "v000007" is never reused.
            C("last_seq", sa.BigInteger, nullable=False),
            C("create_time", sa.Double, nullable=False),
        )
        self.model_versions = sa.Table(
            "model_versions",
            md,
            C("name", _key_type(), sa.ForeignKey("models.name", ondelete="CASCADE"), primary_key=True),
            C("version", _key_type(), primary_key=True),
            C("seq", sa.BigInteger, nullable=False),
            C("file_name", sa.Text, nullable=False),
            C("sha256", sa.String(64), nullable=False),
            C("size", sa.BigInteger, nullable=False),
            C("metrics", _json_type(), nullable=False),
            C("info", _json_type(), nullable=False),
            C("create_time", sa.Double, nullable=False),
            sa.UniqueConstraint("name", "seq", name="uq_model_versions_seq"),
        )
        self.records = sa.Table(
            "records",
            md,
            C("kind", _key_type(), primary_key=True),
            C("id", _key_type(), primary_key=True),
            C("data", _json_type(), nullable=False),
            C("revision", sa.BigInteger, nullable=False),
            C("create_time", sa.Double, nullable=False),
            C("update_time", sa.Double, nullable=False),
        )


# --------------------------------------------------------------------------- bulk import types


@dataclass(frozen=True)
class BulkImportResult:
    images_added: int
    images_updated: int  # existing rows whose file facts or info changed
    images_unchanged: int
    labels_added: int
    labels_updated: int
    labels_unchanged: int
    labels_skipped: int  # labels of images that are neither indexed nor imported


# --------------------------------------------------------------------------- helpers


def _epoch(now: Now) -> float:
    if now is None:
        return time.time()
    if isinstance(now, datetime):
        if now.tzinfo is None:  # naive = UTC, never the host's local zone
            now = now.replace(tzinfo=UTC)
        return now.timestamp()
    return float(now)


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)


def _check_json(value: Any, what: str) -> dict[str, Any]:
    """Refuse what would not round-trip through both backends (NaN, non-JSON types)."""
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{what} must be a JSON object")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{what} is not valid JSON: {e}") from None


def _encode_token(kind: str, payload: dict[str, Any]) -> str:
    raw = json.dumps({"k": kind, **payload}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, kind: str) -> dict[str, Any] | None:
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


def _image_not_found(image_id: str) -> NotFound:
    return NotFound(f"image {image_id!r} not found", reason="IMAGE_NOT_FOUND")


def _label_not_found(image_id: str, tag: str) -> NotFound:
    return NotFound(f"label {tag!r} of image {image_id!r} not found", reason="LABEL_NOT_FOUND")


def _model_not_found(name: str) -> NotFound:
    return NotFound(f"model {name!r} not found", reason="MODEL_NOT_FOUND")


def _version_not_found(name: str, version: str) -> NotFound:
    return NotFound(f"model version {name!r}/{version!r} not found", reason="MODEL_NOT_FOUND")


def _record_not_found(kind: str, record_id: str) -> NotFound:
    return NotFound(f"record {kind!r}/{record_id!r} not found", reason="RECORD_NOT_FOUND")


def _lease_not_found(image_id: str, client_id: str) -> NotFound:
    return NotFound(f"client {client_id!r} holds no lease on image {image_id!r}", reason="LEASE_NOT_FOUND")


def _check_revision(expected: int | None, actual: int, what: str) -> None:
    if expected and expected != actual:
        raise Aborted(f"{what} is at revision {actual}, not {expected}; re-read and retry")


def _describe(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


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


def _keys_fit(cols: Sequence[tuple[sa.ColumnElement[Any], bool]], last: Sequence[Any]) -> bool:
    """A token's sort key has the right arity and types (a forged one must not reach SQL)."""
    if len(last) != len(cols):
        return False
    for (col, _), v in zip(cols, last):
        if isinstance(col.type, sa.Double):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return False
        elif not isinstance(v, str):
            return False
    return True


# --------------------------------------------------------------------------- the index


class SqlIndex:
    """Metadata index on SQLite (``sqlite:///path/index.db``) or PostgreSQL (``postgresql+psycopg://…``)."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 5,
        max_overflow: int = 15,
        busy_timeout_s: float = 30.0,
        max_attempts: int = 5,
        echo: bool = False,
    ) -> None:
        try:
            parsed = make_url(url)
        except sa_exc.ArgumentError:
            raise InvalidArgument("invalid index URL: use sqlite:///path/index.db or postgresql+psycopg://…") from None
        backend = parsed.get_backend_name()
        self._max_attempts = max(1, max_attempts)
        self._t = _Schema()
        if backend == "sqlite":
            db = parsed.database
            if not db or db == ":memory:" or db.startswith("file::memory:"):
                raise InvalidArgument("the SQLite index needs a file: sqlite:///path/to/index.db")
            Path(db).parent.mkdir(parents=True, exist_ok=True)
            self._engine: Engine = sa.create_engine(
                parsed,
                echo=echo,
                pool_size=pool_size,
                max_overflow=max_overflow,
                connect_args={"check_same_thread": False, "timeout": busy_timeout_s},
            )
            self._install_sqlite_hooks(int(busy_timeout_s * 1000))
            self._write_lock: contextlib.AbstractContextManager[Any] = threading.Lock()
            self._pg = False
        elif backend == "postgresql":
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            self._engine = sa.create_engine(
                parsed, echo=echo, pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True
            )
            self._write_lock = contextlib.nullcontext()
            self._pg = True
        else:
            raise InvalidArgument(
                f"unsupported index URL {parsed.drivername!r}: use sqlite:///path/index.db or postgresql+psycopg://…"
            )
        self._insert = pg_dialect.insert if self._pg else sqlite_dialect.insert
        # Read cache of the hot listings (see _cached): SQLite only, where this object is the
        # index's one writer, so every change bumps _generation.
        self._generation = 0
        self._generation_lock = threading.Lock()
        self._read_cache: dict[tuple[Any, ...], tuple[int, Any]] = {}
        try:
            self._init_schema()
        except BaseException:
            self._engine.dispose()
            raise

    # ------------------------------------------------------------------ plumbing

    @property
    def backend(self) -> str:
        """"postgresql" or "sqlite"."""
        return "postgresql" if self._pg else "sqlite"

    def close(self) -> None:
        """Closes every pooled connection (tests and shutdown; PostgreSQL counts connections)."""
        self._engine.dispose()

    def __enter__(self) -> SqlIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _install_sqlite_hooks(self, busy_ms: int) -> None:
        @sa.event.listens_for(self._engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control away from pysqlite so that we can say BEGIN IMMEDIATE.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")  # first: switching to WAL may wait
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @sa.event.listens_for(self._engine, "begin")
        def _on_begin(conn: Connection) -> None:
            write = conn.get_execution_options().get("labelgrid_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    def _init_schema(self) -> None:
        def tx(conn: Connection) -> None:
            if self._pg:  # replicas starting together must not race create_all
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7426133)"))
            self._t.metadata.create_all(conn, checkfirst=True)
            meta = self._t.meta
            row = conn.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).first()
            if row is None:
                conn.execute(sa.insert(meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row.value) > SCHEMA_VERSION:
                raise StorageError(
                    f"the index has schema version {row.value}, newer than this datastore understands "
                    f"({SCHEMA_VERSION}); upgrade the datastore"
                )
            elif int(row.value) < 2:
                conn.exec_driver_sql("ALTER TABLE images ADD COLUMN final BOOLEAN NOT NULL DEFAULT false")
                for ix in self._t.images.indexes:
                    ix.create(conn, checkfirst=True)
                conn.execute(sa.update(self._t.images).values(final=self._label_exists(DEFAULT_TAG_FINAL)))
                conn.execute(sa.update(meta).where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION)))

        self._write(tx, "initialisation")

    def _retryable(self, e: sa_exc.DBAPIError) -> bool:
        if e.connection_invalidated:
            return False  # the commit may have happened: never replay a write blindly
        if isinstance(e, sa_exc.IntegrityError):
            return True  # a create raced another (e.g. a row deleted under a lease insert)
        if self._pg:
            return getattr(e.orig, "sqlstate", None) in ("40001", "40P01")
        msg = str(e.orig).lower()
        return isinstance(e, sa_exc.OperationalError) and ("locked" in msg or "busy" in msg)

    def _write(self, fn: Callable[[Connection], _T], what: str) -> _T:
        """Runs ``fn`` in one write transaction, retrying deadlocks and lost create races."""
        for attempt in range(self._max_attempts):
            try:
                with self._write_lock, self._engine.connect() as conn:
                    if not self._pg:
                        conn.execution_options(labelgrid_write=True)
                    try:
                        with conn.begin():
                            return fn(conn)
                    finally:  # committed or not: cached reads taken before are no longer trusted
                        self._bump_generation()
            except LabelgridError:
                raise
            except sa_exc.DBAPIError as e:
                if attempt + 1 < self._max_attempts and self._retryable(e):
                    _log.debug("index %s: retrying after %s", what, _describe(e))
                    time.sleep(random.uniform(0.001, 0.01) * (2**attempt))
                    continue
                raise StorageError(f"index {what} failed: {_describe(e)}") from e
            except sa_exc.SQLAlchemyError as e:
                raise StorageError(f"index {what} failed: {_describe(e)}") from e
        raise AssertionError("unreachable")

    def _bump_generation(self) -> None:
        with self._generation_lock:
            self._generation += 1

    def _cached(self, key: tuple[Any, ...], compute: Callable[[], _T]) -> _T:
        """``compute()``, reused until the next write transaction (SQLite only).

        The generation is read before computing and the result kept under it; a write that
        commits meanwhile bumps it after its commit, so a result that may predate the write
        is never served. PostgreSQL may have other writers (replicas): never cached there."""
        if self._pg:
            return compute()
        with self._generation_lock:
            generation = self._generation
        hit = self._read_cache.get(key)
        if hit is not None and hit[0] == generation:
            return hit[1]  # type: ignore[no-any-return]
        value = compute()
        self._read_cache[key] = (generation, value)
        return value

    def _peek(self, key: tuple[Any, ...]) -> Any | None:
        """What ``_cached`` would reuse for ``key`` now, else None (never blocks on the database)."""
        with self._generation_lock:
            generation = self._generation
        hit = self._read_cache.get(key)
        return hit[1] if hit is not None and hit[0] == generation else None

    def _read(self, fn: Callable[[Connection], _T], what: str) -> _T:
        """Runs ``fn`` in one read-only snapshot (several statements see the same data)."""
        try:
            with self._engine.connect() as conn:
                if self._pg:
                    conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    return fn(conn)
        except LabelgridError:
            raise
        except sa_exc.SQLAlchemyError as e:
            raise StorageError(f"index {what} failed: {_describe(e)}") from e

    def _insert_ignore(self, conn: Connection, table: sa.Table, values: dict[str, Any]) -> bool:
        """INSERT unless the key exists (race-free on both backends); True if inserted.

        RETURNING, not rowcount: SQLAlchemy 2.1 with psycopg reports -1 for INSERTs."""
        stmt = self._insert(table).values(**values).on_conflict_do_nothing()
        return conn.execute(stmt.returning(*table.primary_key.columns)).first() is not None

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
            create_time=_dt(r.create_time),
            update_time=_dt(r.update_time),
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
                create_time=_dt(r.create_time),
                update_time=_dt(r.update_time),
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

    def _require_image_row(self, conn: Connection, image_id: str, *, lock: bool = False) -> Row[Any]:
        row = self._image_row(conn, image_id, lock=lock)
        if row is None:
            raise _image_not_found(image_id)
        return row

    def _load_image(self, conn: Connection, image_id: str) -> ImageRecord:
        return self._images_from_rows(conn, [self._require_image_row(conn, image_id)])[0]

    # ------------------------------------------------------------------ images

    def upsert_image(
        self,
        image_id: str,
        ext: str,
        sha256: str,
        size: int,
        info: Mapping[str, Any] | None = None,
        *,
        fail_if_exists: bool = False,
        now: Now = None,
    ) -> ImageRecord:
        """Adds an image, or replaces an existing one's file facts and info.

        Re-upload keeps the image's labels and lease (MONAI Label drops the label entries
        but keeps the label files, which its next reconcile adopts again: keeping them is
        that end state without the window where they vanish) and its create time; the
        info is replaced as MONAI Label does, and the scores are dropped when the
        content changed, because they were computed on the old bytes.
        """
        info_ = _check_json(info or {}, "image info")
        t = _epoch(now)
        images = self._t.images

        def tx(conn: Connection) -> ImageRecord:
            values = dict(
                id=image_id, ext=ext, sha256=sha256, size=size, info=info_, revision=1,
                rand=random.random(), create_time=t, update_time=t,
            )
            if not self._insert_ignore(conn, images, values):
                old = self._require_image_row(conn, image_id, lock=True)
                if fail_if_exists:
                    raise AlreadyExists(f"image {image_id!r} already exists")
                conn.execute(
                    sa.update(images)
                    .where(images.c.id == image_id)
                    .values(ext=ext, sha256=sha256, size=size, info=info_, revision=old.revision + 1, update_time=t)
                )
                if old.sha256 != sha256:
                    conn.execute(sa.delete(self._t.scores).where(self._t.scores.c.image_id == image_id))
            return self._load_image(conn, image_id)

        return self._write(tx, "upsert_image")

    def get_image(self, image_id: str) -> ImageRecord:
        """The image with its labels and scores; NOT_FOUND (IMAGE_NOT_FOUND) if unknown."""
        return self._read(lambda conn: self._load_image(conn, image_id), "get_image")

    def delete_image(self, image_id: str) -> ImageRecord:
        """Removes the image; its labels, scores and lease go with it (ON DELETE CASCADE)."""

        def tx(conn: Connection) -> ImageRecord:
            self._require_image_row(conn, image_id, lock=True)
            rec = self._load_image(conn, image_id)
            conn.execute(sa.delete(self._t.images).where(self._t.images.c.id == image_id))
            return rec

        return self._write(tx, "delete_image")

    def update_image_info(
        self,
        image_id: str,
        info: Mapping[str, Any],
        *,
        replace: bool = False,
        expected_revision: int | None = None,
        now: Now = None,
    ) -> ImageRecord:
        """Shallow-merges ``info`` into the image info (MONAI Label's update_image_info).

        The row is locked (or the database write-locked) across read-merge-write, so
        concurrent writers merging different keys never lose each other. A falsy
        ``expected_revision`` (None or 0, as the proto's "unset") means unconditional.
        """
        info_ = _check_json(info, "image info")
        t = _epoch(now)
        images = self._t.images

        def tx(conn: Connection) -> ImageRecord:
            old = self._require_image_row(conn, image_id, lock=True)
            _check_revision(expected_revision, old.revision, f"image {image_id!r}")
            merged = info_ if replace else {**(old.info or {}), **info_}
            conn.execute(
                sa.update(images)
                .where(images.c.id == image_id)
                .values(info=merged, revision=old.revision + 1, update_time=t)
            )
            return self._load_image(conn, image_id)

        return self._write(tx, "update_image_info")

    # ------------------------------------------------------------------ labels

    def upsert_label(
        self,
        image_id: str,
        tag: str,
        ext: str,
        sha256: str,
        size: int,
        info: Mapping[str, Any] | None = None,
        *,
        now: Now = None,
    ) -> LabelRecord:
        """Saves a label (info replaced, as MONAI Label's save_label); a "final" label releases the image's lease."""
        info_ = _check_json(info or {}, "label info")
        t = _epoch(now)
        labels = self._t.labels

        def tx(conn: Connection) -> LabelRecord:
            # Lock the image first: every writer touching an image's labels or lease takes
            # this lock first, so a lease acquirer sees the label once it holds the image.
            self._require_image_row(conn, image_id, lock=True)
            key = (labels.c.image_id == image_id) & (labels.c.tag == tag)
            old = conn.execute(sa.select(labels.c.revision).where(key)).first()
            if old is None:
                conn.execute(
                    sa.insert(labels).values(
                        image_id=image_id, tag=tag, ext=ext, sha256=sha256, size=size, info=info_,
                        revision=1, create_time=t, update_time=t,
                    )
                )
            else:
                conn.execute(
                    sa.update(labels)
                    .where(key)
                    .values(ext=ext, sha256=sha256, size=size, info=info_, revision=old.revision + 1, update_time=t)
                )
            if tag == DEFAULT_TAG_FINAL:
                conn.execute(sa.delete(self._t.leases).where(self._t.leases.c.image_id == image_id))
                conn.execute(sa.update(self._t.images).where(self._t.images.c.id == image_id).values(final=True))
            return self._label_record(conn.execute(sa.select(labels).where(key)).one())

        return self._write(tx, "upsert_label")

    def _label_row(self, conn: Connection, image_id: str, tag: str, *, lock: bool = False) -> Row[Any]:
        labels = self._t.labels
        q = sa.select(labels).where((labels.c.image_id == image_id) & (labels.c.tag == tag))
        if lock:
            q = q.with_for_update()
        row = conn.execute(q).first()
        if row is None:
            raise _label_not_found(image_id, tag)
        return row

    def get_label(self, image_id: str, tag: str) -> LabelRecord:
        """NOT_FOUND (LABEL_NOT_FOUND) if the image has no label under ``tag``."""
        return self._read(lambda conn: self._label_record(self._label_row(conn, image_id, tag)), "get_label")

    def delete_label(self, image_id: str, tag: str) -> LabelRecord:
        labels = self._t.labels

        def tx(conn: Connection) -> LabelRecord:
            if tag == DEFAULT_TAG_FINAL:  # same lock order as upsert_label: image first
                self._require_image_row(conn, image_id, lock=True)
            rec = self._label_record(self._label_row(conn, image_id, tag, lock=True))
            conn.execute(sa.delete(labels).where((labels.c.image_id == image_id) & (labels.c.tag == tag)))
            if tag == DEFAULT_TAG_FINAL:
                conn.execute(sa.update(self._t.images).where(self._t.images.c.id == image_id).values(final=False))
            return rec

        return self._write(tx, "delete_label")

    def update_label_info(
        self,
        image_id: str,
        tag: str,
        info: Mapping[str, Any],
        *,
        replace: bool = False,
        expected_revision: int | None = None,
        now: Now = None,
    ) -> LabelRecord:
        """Shallow-merges into a label's info; same guarantees as ``update_image_info``."""
        info_ = _check_json(info, "label info")
        t = _epoch(now)
        labels = self._t.labels

        def tx(conn: Connection) -> LabelRecord:
            old = self._label_row(conn, image_id, tag, lock=True)
            _check_revision(expected_revision, old.revision, f"label {tag!r} of image {image_id!r}")
            merged = info_ if replace else {**(old.info or {}), **info_}
            key = (labels.c.image_id == image_id) & (labels.c.tag == tag)
            conn.execute(sa.update(labels).where(key).values(info=merged, revision=old.revision + 1, update_time=t))
            return self._label_record(conn.execute(sa.select(labels).where(key)).one())

        return self._write(tx, "update_label_info")

    # ------------------------------------------------------------------ listing

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

    def list_images(
        self,
        *,
        filter: ImageFilter = ImageFilter.ALL,
        tag: str = DEFAULT_TAG_FINAL,
        order: ImageOrder = ImageOrder.ID,
        score_key: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        exclude_leased: bool = False,
        now: Now = None,
    ) -> Page[ImageRecord]:
        """One page of images (with labels and scores), keyset-paginated.

        SCORE_DESC lists the images that have ``score_key`` by value (ties by id), then
        the images without it by id: nothing is left out. RANDOM is a random rotation of
        a fixed random permutation (the start is drawn on the first page and kept in the
        token), so paging through it still yields every image exactly once.
        ``total_size`` counts every image matching the filter.
        """
        size = _check_page_size(page_size)
        tag = tag or DEFAULT_TAG_FINAL
        sig = {"f": filter.value, "t": tag, "o": order.value, "s": score_key or "", "x": bool(exclude_leased)}
        tok = _decode_token(page_token, "images")
        if tok is not None:
            if any(tok.get(k) != v for k, v in sig.items()):
                raise InvalidArgument("invalid page_token: it belongs to a listing with other parameters")
            seg_i, last, r0 = tok.get("i"), tok.get("l"), tok.get("r")
            if not isinstance(seg_i, int) or not isinstance(last, list) or not (r0 is None or isinstance(r0, float)):
                raise InvalidArgument("invalid page_token")
        else:
            seg_i, last = 0, None
            r0 = random.random() if order is ImageOrder.RANDOM else None
        segs = self._segments(order, score_key, r0)
        if not 0 <= seg_i < len(segs) or (last is not None and not _keys_fit(segs[seg_i].cols, last)):
            raise InvalidArgument("invalid page_token")
        t = _epoch(now)
        im = self._t.images
        base: list[sa.ColumnElement[bool]] = []
        if filter is ImageFilter.LABELED:
            base.append(self._has_label(tag))
        elif filter is ImageFilter.UNLABELED:
            base.append(self._lacks_label(tag))
        if exclude_leased:
            base.append(~self._has_live_lease(t))

        def tx(conn: Connection) -> Page[ImageRecord]:
            total = conn.execute(sa.select(sa.func.count()).select_from(im).where(*base)).scalar_one()
            got: list[tuple[int, Row[Any]]] = []
            i, lst = seg_i, last
            while i < len(segs) and len(got) <= size:
                want = size + 1 - len(got)
                rows = conn.execute(self._segment_query(segs[i], base, lst, want, list(im.c))).all()
                got.extend((i, r) for r in rows)
                if len(rows) < want:
                    i, lst = i + 1, None
            token = ""
            if len(got) > size:
                got = got[:size]
                end_i, end_row = got[-1]
                keys = [getattr(end_row, f"k{j}") for j in range(len(segs[end_i].cols))]
                token = _encode_token("images", {**sig, "i": end_i, "l": keys, "r": r0})
            items = self._images_from_rows(conn, [r for _, r in got])
            return Page(items=items, next_page_token=token, total_size=total)

        return self._read(tx, "list_images")

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

    def status(self, *, hidden_id_prefix: str = "", hidden_info_key: str = "") -> DatastoreStatus:
        """MONAI Label's status(): image count, images with a final label, labels per tag.

        Images matching ``hidden_id_prefix`` + ``hidden_info_key`` (see ``_hidden``) and
        their labels are not counted."""
        im, lb = self._t.images, self._t.labels
        hidden = self._hidden(hidden_id_prefix, hidden_info_key)

        def tx(conn: Connection) -> DatastoreStatus:
            q_total = sa.select(sa.func.count()).select_from(im)
            q_tags = sa.select(lb.c.tag, sa.func.count().label("n")).group_by(lb.c.tag).order_by(lb.c.tag)
            if hidden is not None:
                q_total = q_total.where(~hidden)
                hidden_ids = sa.select(im.c.id).where(hidden)
                q_tags = q_tags.where(
                    ~(
                        (sa.func.substr(lb.c.image_id, 1, len(hidden_id_prefix)) == hidden_id_prefix)
                        & lb.c.image_id.in_(hidden_ids)
                    )
                )
            total = conn.execute(q_total).scalar_one()
            tags = {r.tag: r.n for r in conn.execute(q_tags)}
            # (image_id, tag) is the primary key: one final label per image at most.
            return DatastoreStatus(total=total, completed=tags.get(DEFAULT_TAG_FINAL, 0), label_tags=tags)

        status = self._cached(("status", hidden_id_prefix, hidden_info_key), lambda: self._read(tx, "status"))
        return DatastoreStatus(status.total, status.completed, dict(status.label_tags))

    def status_if_cached(self, *, hidden_id_prefix: str = "", hidden_info_key: str = "") -> DatastoreStatus | None:
        """``status()`` if it is answered from the cache (no database access), else None."""
        status = self._peek(("status", hidden_id_prefix, hidden_info_key))
        return None if status is None else DatastoreStatus(status.total, status.completed, dict(status.label_tags))

    # ------------------------------------------------------------------ scores

    def set_score(
        self,
        image_id: str,
        key: str,
        value: float,
        model_version: str = "",
        *,
        info: Mapping[str, Any] | None = None,
        now: Now = None,
    ) -> None:
        """Stores a score; ``info`` (e.g. {"epistemic_entropy": v, "epistemic_ts": ts}) is
        shallow-merged into the image info in the same transaction, as MONAI Label keeps
        scores in the info."""
        value = float(value)
        if math.isnan(value):
            raise InvalidArgument(f"score {key!r} of image {image_id!r} is NaN")
        info_ = _check_json(info, "image info") if info else None
        t = _epoch(now)
        sc, im = self._t.scores, self._t.images

        def tx(conn: Connection) -> None:
            row = self._require_image_row(conn, image_id, lock=True)
            stmt = self._insert(sc).values(image_id=image_id, key=key, value=value, model_version=model_version, time=t)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[sc.c.image_id, sc.c.key],
                    set_={"value": value, "model_version": model_version, "time": t},
                )
            )
            if info_:
                conn.execute(
                    sa.update(im)
                    .where(im.c.id == image_id)
                    .values(info={**(row.info or {}), **info_}, revision=row.revision + 1, update_time=t)
                )

        self._write(tx, "set_score")

    def get_scores(self, image_id: str) -> dict[str, float]:
        sc = self._t.scores

        def tx(conn: Connection) -> dict[str, float]:
            self._require_image_row(conn, image_id)
            q = sa.select(sc.c.key, sc.c.value).where(sc.c.image_id == image_id).order_by(sc.c.key)
            return {r.key: r.value for r in conn.execute(q)}

        return self._read(tx, "get_scores")

    # ------------------------------------------------------------------ leases

    @staticmethod
    def _lease_record(r: Row[Any]) -> LeaseRecord:
        return LeaseRecord(
            image_id=r.image_id,
            client_id=r.client_id,
            strategy=r.strategy,
            acquire_time=_dt(r.acquire_time),
            expire_time=_dt(r.expire_time),
        )

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
        t = _epoch(now)
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
            if self._pg:
                image_id = claim(conn, "skip") or claim(conn, "wait")
            else:
                image_id = claim(conn, "plain")
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
        t = _epoch(now)
        ls = self._t.leases
        key = (ls.c.image_id == image_id) & (ls.c.client_id == client_id)

        def tx(conn: Connection) -> LeaseRecord:
            live = key & (ls.c.expire_time > t)
            if conn.execute(sa.update(ls).where(live).values(expire_time=t + ttl_seconds)).rowcount != 1:
                raise _lease_not_found(image_id, client_id)
            return self._lease_record(conn.execute(sa.select(ls).where(key)).one())

        return self._write(tx, "renew_lease")

    def release_lease(self, image_id: str, client_id: str, *, now: Now = None) -> None:
        """NOT_FOUND (LEASE_NOT_FOUND) if that client holds no live lease on the image
        (an expired one is left for ``acquire_next_lease`` / ``expire_leases`` to reuse)."""
        t = _epoch(now)
        ls = self._t.leases

        def tx(conn: Connection) -> None:
            key = (ls.c.image_id == image_id) & (ls.c.client_id == client_id) & (ls.c.expire_time > t)
            if conn.execute(sa.delete(ls).where(key)).rowcount != 1:
                raise _lease_not_found(image_id, client_id)

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
        tok = _decode_token(page_token, "leases")
        after = tok.get("i") if tok else None
        if tok is not None and (not isinstance(after, str) or tok.get("c") != (client_id or "")):
            raise InvalidArgument("invalid page_token")
        t = _epoch(now)
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
                token = _encode_token("leases", {"c": client_id or "", "i": rows[-1].image_id})
            return Page(items=[self._lease_record(r) for r in rows], next_page_token=token, total_size=total)

        return self._read(tx, "list_leases")

    def expire_leases(self, now: Now = None) -> int:
        """Deletes leases that expired by ``now``; returns how many. Optional housekeeping:
        expired leases are already ignored (and taken over) by ``acquire_next_lease``."""
        t = _epoch(now)
        ls = self._t.leases
        return self._write(
            lambda conn: conn.execute(sa.delete(ls).where(ls.c.expire_time <= t)).rowcount, "expire_leases"
        )

    # ------------------------------------------------------------------ models

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
            create_time=_dt(r.create_time),
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
            raise _model_not_found(name)
        latest = conn.execute(sa.select(self._latest_version_expr()).select_from(m).where(m.c.name == name)).scalar()
        return ModelRecord(model=name, latest_version=latest, pinned_version=row.pinned_version)

    def add_model_version(
        self,
        name: str,
        version: str | None,
        file_name: str,
        sha256: str,
        size: int,
        metrics: Mapping[str, Any] | None = None,
        info: Mapping[str, Any] | None = None,
        *,
        now: Now = None,
    ) -> ModelVersionRecord:
        """Publishes a version; ``version=None`` takes the next "v000001"-style number.

        Numbers come from a per-model counter updated under the model row's lock, so
        concurrent publishers get distinct, increasing versions; a number is never reused
        after a delete. An explicit version that exists is ALREADY_EXISTS.
        """
        metrics_ = _check_json(metrics or {}, "model metrics")
        info_ = _check_json(info or {}, "model info")
        t = _epoch(now)
        m, mv = self._t.models, self._t.model_versions

        def tx(conn: Connection) -> ModelVersionRecord:
            self._insert_ignore(conn, m, {"name": name, "pinned_version": None, "last_seq": 0, "create_time": t})
            seq = conn.execute(sa.select(m.c.last_seq).where(m.c.name == name).with_for_update()).scalar_one() + 1

            def exists(v: str) -> bool:
                q = sa.select(mv.c.seq).where((mv.c.name == name) & (mv.c.version == v))
                return conn.execute(q).first() is not None

            if version is None:
                while exists(v := f"v{seq:06d}"):
                    seq += 1
            elif exists(v := version):
                raise AlreadyExists(f"model version {name!r}/{version!r} already exists")
            conn.execute(
                sa.insert(mv).values(
                    name=name, version=v, seq=seq, file_name=file_name, sha256=sha256, size=size,
                    metrics=metrics_, info=info_, create_time=t,
                )
            )
            conn.execute(sa.update(m).where(m.c.name == name).values(last_seq=seq))
            return self._version_record(
                conn.execute(sa.select(mv).where((mv.c.name == name) & (mv.c.version == v))).one()
            )

        return self._write(tx, "add_model_version")

    def get_model(self, name: str) -> ModelRecord:
        """A model (any model that ever had a version); NOT_FOUND (MODEL_NOT_FOUND) otherwise."""
        return self._read(lambda conn: self._model_record(conn, name), "get_model")

    def list_models(self, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "") -> Page[ModelRecord]:
        size = _check_page_size(page_size)
        tok = _decode_token(page_token, "models")
        after = tok.get("n") if tok else None
        if tok is not None and not isinstance(after, str):
            raise InvalidArgument("invalid page_token")
        m = self._t.models

        def tx(conn: Connection) -> Page[ModelRecord]:
            total = conn.execute(sa.select(sa.func.count()).select_from(m)).scalar_one()
            q = sa.select(m.c.name, m.c.pinned_version, self._latest_version_expr().label("latest"))
            if after is not None:
                q = q.where(m.c.name > after)
            rows = conn.execute(q.order_by(m.c.name).limit(size + 1)).all()
            token = ""
            if len(rows) > size:
                rows = rows[:size]
                token = _encode_token("models", {"n": rows[-1].name})
            items = [ModelRecord(model=r.name, latest_version=r.latest, pinned_version=r.pinned_version) for r in rows]
            return Page(items=items, next_page_token=token, total_size=total)

        return self._read(tx, "list_models")

    def list_model_versions(
        self, name: str, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> Page[ModelVersionRecord]:
        """Versions newest first; NOT_FOUND if the model is unknown."""
        size = _check_page_size(page_size)
        tok = _decode_token(page_token, "versions")
        after = tok.get("s") if tok else None
        if tok is not None and (not isinstance(after, int) or tok.get("m") != name):
            raise InvalidArgument("invalid page_token")
        mv = self._t.model_versions

        def tx(conn: Connection) -> Page[ModelVersionRecord]:
            self._model_record(conn, name)
            total = conn.execute(sa.select(sa.func.count()).select_from(mv).where(mv.c.name == name)).scalar_one()
            q = sa.select(mv).where(mv.c.name == name)
            if after is not None:
                q = q.where(mv.c.seq < after)
            rows = conn.execute(q.order_by(mv.c.seq.desc()).limit(size + 1)).all()
            token = ""
            if len(rows) > size:
                rows = rows[:size]
                token = _encode_token("versions", {"m": name, "s": rows[-1].seq})
            return Page(items=[self._version_record(r) for r in rows], next_page_token=token, total_size=total)

        return self._read(tx, "list_model_versions")

    def _version_row(self, conn: Connection, name: str, version: str) -> Row[Any]:
        mv = self._t.model_versions
        row = conn.execute(sa.select(mv).where((mv.c.name == name) & (mv.c.version == version))).first()
        if row is None:
            raise _version_not_found(name, version)
        return row

    def get_model_version(self, name: str, version: str) -> ModelVersionRecord:
        return self._read(
            lambda conn: self._version_record(self._version_row(conn, name, version)), "get_model_version"
        )

    def delete_model_version(self, name: str, version: str) -> ModelVersionRecord:
        """FAILED_PRECONDITION if the version is pinned (unpin first)."""
        mv = self._t.model_versions

        def tx(conn: Connection) -> ModelVersionRecord:
            model = self._model_record(conn, name, lock=True)
            rec = self._version_record(self._version_row(conn, name, version))
            if model.pinned_version == version:
                raise FailedPrecondition(f"model version {name!r}/{version!r} is pinned; unpin it before deleting")
            conn.execute(sa.delete(mv).where((mv.c.name == name) & (mv.c.version == version)))
            return rec

        return self._write(tx, "delete_model_version")

    def pin_model_version(self, name: str, version: str | None) -> ModelRecord:
        """Pins the served version (rollback); None unpins (serve the latest)."""
        m = self._t.models

        def tx(conn: Connection) -> ModelRecord:
            self._model_record(conn, name, lock=True)
            if version:
                self._version_row(conn, name, version)
            conn.execute(sa.update(m).where(m.c.name == name).values(pinned_version=version or None))
            return self._model_record(conn, name)

        return self._write(tx, "pin_model_version")

    # ------------------------------------------------------------------ records

    @staticmethod
    def _record(r: Row[Any]) -> Record:
        return Record(
            kind=r.kind,
            record_id=r.id,
            data=dict(r.data or {}),
            revision=r.revision,
            create_time=_dt(r.create_time),
            update_time=_dt(r.update_time),
        )

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
        data_ = _check_json(data, "record data")
        t = _epoch(now)
        rc = self._t.records
        key = (rc.c.kind == kind) & (rc.c.id == record_id)

        def tx(conn: Connection) -> Record:
            created = False
            if expected_revision is None or expected_revision <= 0:
                created = self._insert_ignore(
                    conn, rc, dict(kind=kind, id=record_id, data=data_, revision=1, create_time=t, update_time=t)
                )
            if not created:
                old = conn.execute(sa.select(rc.c.revision).where(key).with_for_update()).first()
                if old is None:
                    raise _record_not_found(kind, record_id)
                if expected_revision == -1:
                    raise Aborted(f"record {kind!r}/{record_id!r} already exists")
                _check_revision(expected_revision if (expected_revision or 0) > 0 else None, old.revision,
                                f"record {kind!r}/{record_id!r}")
                conn.execute(sa.update(rc).where(key).values(data=data_, revision=old.revision + 1, update_time=t))
            return self._record(conn.execute(sa.select(rc).where(key)).one())

        return self._write(tx, "put_record")

    def get_record(self, kind: str, record_id: str) -> Record:
        rc = self._t.records

        def tx(conn: Connection) -> Record:
            row = conn.execute(sa.select(rc).where((rc.c.kind == kind) & (rc.c.id == record_id))).first()
            if row is None:
                raise _record_not_found(kind, record_id)
            return self._record(row)

        return self._read(tx, "get_record")

    def list_records(self, kind: str, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "") -> Page[Record]:
        """Records of a kind by id (plain string order)."""
        size = _check_page_size(page_size)
        tok = _decode_token(page_token, "records")
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
                token = _encode_token("records", {"n": kind, "i": rows[-1].id})
            return Page(items=[self._record(r) for r in rows], next_page_token=token, total_size=total)

        return self._read(tx, "list_records")

    def delete_record(self, kind: str, record_id: str) -> Record:
        rc = self._t.records
        key = (rc.c.kind == kind) & (rc.c.id == record_id)

        def tx(conn: Connection) -> Record:
            row = conn.execute(sa.select(rc).where(key).with_for_update()).first()
            if row is None:
                raise _record_not_found(kind, record_id)
            conn.execute(sa.delete(rc).where(key))
            return self._record(row)

        return self._write(tx, "delete_record")

    # ------------------------------------------------------------------ MONAI Label model, reindex

    def export_monailabel_model(self, name: str = "new-dataset", description: str = "New Dataset") -> dict[str, Any]:
        """The whole index as MONAI Label 0.8.5's ``datastore_v2.json`` model (one snapshot).

        Objects are keyed by image id in id order. ``ts`` and ``name`` are filled in when an
        info lacks them (MONAI Label always has them; images registered without them would
        otherwise confuse MONAI Label readers); the stored info is not changed.
        """
        im, lb = self._t.images, self._t.labels

        def tx(conn: Connection) -> dict[str, Any]:
            objects: dict[str, Any] = {}
            for r in conn.execute(sa.select(im.c.id, im.c.ext, im.c.info, im.c.create_time).order_by(im.c.id)):
                info = dict(r.info or {})
                info.setdefault("ts", int(r.create_time))
                info.setdefault("name", f"{r.id}{r.ext}")
                objects[r.id] = {"image": {"ext": r.ext, "info": info}, "labels": {}}
            q = sa.select(lb.c.image_id, lb.c.tag, lb.c.ext, lb.c.info, lb.c.create_time)
            q = q.order_by(lb.c.image_id, lb.c.tag)
            for lr in conn.execute(q):
                obj = objects.get(lr.image_id)
                if obj is None:  # cannot happen (FK), but never export a dangling label
                    continue
                info = dict(lr.info or {})
                info.setdefault("ts", int(lr.create_time))
                info.setdefault("name", f"{lr.image_id}{lr.ext}")
                obj["labels"][lr.tag] = {"ext": lr.ext, "info": info}
            return {
                "name": name,
                "description": description,
                "images_dir": ".",
                "labels_dir": "labels",
                "objects": objects,
            }

        return self._read(tx, "export_monailabel_model")

    def export_monailabel_json(
        self,
        name: str = "new-dataset",
        description: str = "New Dataset",
        *,
        hidden_id_prefix: str = "",
        hidden_info_key: str = "",
    ) -> bytes:
        """``export_monailabel_model`` already serialised, as FastAPI would send it (compact
        separators, UTF-8), leaving out the images ``_hidden`` names: MONAI Label's
        ``GET /datastore/?output=all`` answer in one read.

        On SQLite one statement builds every object's JSON inside the database (the stored
        info text is never turned into Python objects); PostgreSQL goes through Python.
        """
        head = json.dumps(
            {"name": name, "description": description, "images_dir": ".", "labels_dir": "labels"},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        head = head[:-1] + ',"objects":{'
        hidden = self._hidden(hidden_id_prefix, hidden_info_key)
        if self._pg:
            model = self.export_monailabel_model(name, description)
            if hidden is not None:
                model["objects"] = {
                    k: v
                    for k, v in model["objects"].items()
                    if not (k.startswith(hidden_id_prefix) and v["image"]["info"].get(hidden_info_key) is True)
                }
            return json.dumps(model, separators=(",", ":"), ensure_ascii=False).encode()
        # Labels come in primary-key order (image_id, tag), so each object's tags are sorted;
        # json_insert adds ts and name where the info lacks them, as export_monailabel_model.
        sql = """
            SELECT json_quote(i.id) || ':' || json_object(
                'image', json_object('ext', i.ext, 'info', json_insert(json(i.info),
                    '$.ts', CAST(i.create_time AS INTEGER), '$.name', i.id || i.ext)),
                'labels', json((SELECT coalesce(json_group_object(l.tag, json_object('ext', l.ext,
                    'info', json_insert(json(l.info), '$.ts', CAST(l.create_time AS INTEGER),
                    '$.name', l.image_id || l.ext))), '{}')
                    FROM labels AS l WHERE l.image_id = i.id)))
            FROM images AS i WHERE_HIDDEN ORDER BY i.id
        """
        where = ""
        params: dict[str, Any] = {}
        if hidden is not None:
            where = "WHERE NOT (substr(i.id, 1, :plen) = :prefix AND coalesce(json_type(i.info, :path), '') = 'true')"
            params = {"plen": len(hidden_id_prefix), "prefix": hidden_id_prefix, "path": "$." + json.dumps(hidden_info_key)}
        q = sa.text(sql.replace("WHERE_HIDDEN", where)).bindparams(**params)

        def tx(conn: Connection) -> bytes:
            body = ",".join(conn.execute(q).scalars())
            return (head + body + "}}").encode()

        key = ("export_monailabel_json", name, description, hidden_id_prefix, hidden_info_key)
        return self._cached(key, lambda: self._read(tx, "export_monailabel_json"))

    def export_monailabel_json_if_cached(
        self, name: str = "new-dataset", description: str = "New Dataset", *, hidden_id_prefix: str = "", hidden_info_key: str = ""
    ) -> bytes | None:
        """``export_monailabel_json()`` if it is answered from the cache, else None."""
        return self._peek(("export_monailabel_json", name, description, hidden_id_prefix, hidden_info_key))  # type: ignore[no-any-return]

    def bulk_import(
        self, images: Iterable[ImageImport], labels: Iterable[LabelImport] = (), *, now: Now = None
    ) -> BulkImportResult:
        """Upserts thousands of images and labels in one transaction (reindex).

        Existing rows are updated only when their file facts or info differ (their
        revision then goes up); unchanged rows, leases and scores are left alone, so a
        reindex of an unchanged store is a no-op. Later duplicates win.
        """
        t = _epoch(now)
        img_in = {i.image_id: i for i in images}
        lab_in = {(lab.image_id, lab.tag): lab for lab in labels}
        img_info = {k: _check_json(v.info, f"info of image {k!r}") for k, v in img_in.items()}
        lab_info = {k: _check_json(v.info, f"info of label {k[1]!r} of image {k[0]!r}") for k, v in lab_in.items()}
        im, lb = self._t.images, self._t.labels
        chunk = 500

        def tx(conn: Connection) -> BulkImportResult:
            ids = list(img_in)
            old_imgs: dict[str, Any] = {}
            for i in range(0, len(ids), chunk):
                q = sa.select(im.c.id, im.c.ext, im.c.sha256, im.c.size, im.c.info, im.c.revision)
                for r in conn.execute(q.where(im.c.id.in_(ids[i : i + chunk]))):
                    old_imgs[r.id] = r
            inserts, updates, unchanged = [], [], 0
            for k, v in img_in.items():
                o = old_imgs.get(k)
                if o is None:
                    ct = t if v.create_time is None else float(v.create_time)
                    inserts.append(dict(id=k, ext=v.ext, sha256=v.sha256, size=v.size, info=img_info[k],
                                        revision=1, rand=random.random(), create_time=ct, update_time=t))
                elif (o.ext, o.sha256, o.size, o.info) != (v.ext, v.sha256, v.size, img_info[k]):
                    updates.append(dict(b_id=k, b_ext=v.ext, b_sha=v.sha256, b_size=v.size, b_info=img_info[k],
                                        b_rev=o.revision + 1, b_t=t))
                else:
                    unchanged += 1
            if inserts:
                conn.execute(sa.insert(im), inserts)
            if updates:
                conn.execute(
                    sa.update(im)
                    .where(im.c.id == sa.bindparam("b_id"))
                    .values(ext=sa.bindparam("b_ext"), sha256=sa.bindparam("b_sha"), size=sa.bindparam("b_size"),
                            info=sa.bindparam("b_info", type_=_json_type()), revision=sa.bindparam("b_rev"),
                            update_time=sa.bindparam("b_t")),
                    updates,
                )
            # Labels: their images must be indexed (now, or already).
            need = sorted({k[0] for k in lab_in} - set(img_in))
            known = set(img_in)
            for i in range(0, len(need), chunk):
                known.update(conn.execute(sa.select(im.c.id).where(im.c.id.in_(need[i : i + chunk]))).scalars())
            old_labs: dict[tuple[str, str], Any] = {}
            lab_ids = sorted({k[0] for k in lab_in} & known)
            for i in range(0, len(lab_ids), chunk):
                q = sa.select(lb.c.image_id, lb.c.tag, lb.c.ext, lb.c.sha256, lb.c.size, lb.c.info, lb.c.revision)
                for lr in conn.execute(q.where(lb.c.image_id.in_(lab_ids[i : i + chunk]))):
                    old_labs[(lr.image_id, lr.tag)] = lr
            l_ins, l_upd, l_same, skipped = [], [], 0, 0
            for lk, lv in lab_in.items():
                if lk[0] not in known:
                    skipped += 1
                    continue
                lo = old_labs.get(lk)
                if lo is None:
                    l_ins.append(dict(image_id=lk[0], tag=lk[1], ext=lv.ext, sha256=lv.sha256, size=lv.size,
                                      info=lab_info[lk], revision=1, create_time=t, update_time=t))
                elif (lo.ext, lo.sha256, lo.size, lo.info) != (lv.ext, lv.sha256, lv.size, lab_info[lk]):
                    l_upd.append(dict(b_id=lk[0], b_tag=lk[1], b_ext=lv.ext, b_sha=lv.sha256, b_size=lv.size,
                                      b_info=lab_info[lk], b_rev=lo.revision + 1, b_t=t))
                else:
                    l_same += 1
            if l_ins:
                conn.execute(sa.insert(lb), l_ins)
            if l_upd:
                conn.execute(
                    sa.update(lb)
                    .where((lb.c.image_id == sa.bindparam("b_id")) & (lb.c.tag == sa.bindparam("b_tag")))
                    .values(ext=sa.bindparam("b_ext"), sha256=sa.bindparam("b_sha"), size=sa.bindparam("b_size"),
                            info=sa.bindparam("b_info", type_=_json_type()), revision=sa.bindparam("b_rev"),
                            update_time=sa.bindparam("b_t")),
                    l_upd,
                )
            finals = [r["image_id"] for r in l_ins if r["tag"] == DEFAULT_TAG_FINAL]
            # A final label found by a reindex ends the image's lease, as a saved one does.
            for i in range(0, len(finals), chunk):
                conn.execute(sa.delete(self._t.leases).where(self._t.leases.c.image_id.in_(finals[i : i + chunk])))
            self._sync_final(conn, finals)
            return BulkImportResult(
                images_added=len(inserts), images_updated=len(updates), images_unchanged=unchanged,
                labels_added=len(l_ins), labels_updated=len(l_upd), labels_unchanged=l_same, labels_skipped=skipped,
            )

        result = self._write(tx, "bulk_import")
        if result.images_added + result.labels_added >= 1000:
            self._analyze()
        return result

    def _analyze(self) -> None:
        """Refreshes planner statistics after a large import: on a fresh PostgreSQL table
        the planner otherwise assumes it is empty and picks anti-joins over indexes."""
        try:
            with self._write_lock, self._engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.exec_driver_sql("ANALYZE" if not self._pg else "ANALYZE images, labels, scores")
        except sa_exc.SQLAlchemyError as e:  # statistics are an optimisation only
            _log.warning("index ANALYZE failed: %s", _describe(e))

    def delete_images(self, image_ids: Iterable[str]) -> int:
        """Bulk delete for a reindex (entries whose files are gone); unknown ids are ignored."""
        ids = sorted(set(image_ids))
        im = self._t.images

        def tx(conn: Connection) -> int:
            n = 0
            for i in range(0, len(ids), 500):
                n += conn.execute(sa.delete(im).where(im.c.id.in_(ids[i : i + 500]))).rowcount
            return n

        return self._write(tx, "delete_images")

    def delete_labels(self, keys: Iterable[tuple[str, str]]) -> int:
        """Bulk delete of (image_id, tag) labels for a reindex; unknown ones are ignored."""
        pairs = sorted(set(keys))
        lb = self._t.labels

        def tx(conn: Connection) -> int:
            n = 0
            for image_id, tag in pairs:
                n += conn.execute(sa.delete(lb).where((lb.c.image_id == image_id) & (lb.c.tag == tag))).rowcount
            self._sync_final(conn, [i for i, tag in pairs if tag == DEFAULT_TAG_FINAL])
            return n

        return self._write(tx, "delete_labels")

    def clear(self, *, models: bool = False) -> None:
        """Empties images, labels, scores and leases (and, with ``models``, models and their
        versions). Records are never cleared: job history exists only in the index."""
        t = self._t

        def tx(conn: Connection) -> None:
            for table in (t.leases, t.scores, t.labels, t.images):
                conn.execute(sa.delete(table))
            if models:
                conn.execute(sa.delete(t.model_versions))
                conn.execute(sa.delete(t.models))

        self._write(tx, "clear")
