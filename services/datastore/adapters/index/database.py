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

Change notification (what the read cache and the datastore's WatchChanges stand on):

- SQLite: this object is the index's one writer, so every write bumps the generation.
- PostgreSQL: replicas share the index, so every write transaction also sends
  ``NOTIFY labelgrid_index`` (delivered to listeners when it commits, not at all if it
  rolls back), and ``listen()`` keeps one connection outside the pool that ``LISTEN``s for
  it: each notification (another replica's write, or our own) bumps the generation and
  calls the ``on_change`` callbacks. Only while that connection is up is anything cached
  (``listening``); connecting and losing it bump the generation too, so nothing read while
  notifications could be missed is ever served from the cache. Another replica's write is
  seen once its notification arrives (milliseconds after its commit).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, make_url

from services.common.errors import (
    InvalidArgument,
    LabelgridError,
    StorageError,
)
from services.datastore.adapters.index.schema import Schema
from services.datastore.domain.ports import Now

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

NOTIFY_CHANNEL = "labelgrid_index"
"""PostgreSQL channel every write transaction notifies (see Database.listen)."""
LISTEN_APPLICATION = "labelgrid-index-listen"
"""application_name of the LISTEN connection (pg_stat_activity tells it apart)."""
LISTEN_POLL_SECONDS = 0.5
"""The listener checks for a stop (and that its connection lives) at least this often."""


def epoch(now: Now) -> float:
    if now is None:
        return time.time()
    if isinstance(now, datetime):
        if now.tzinfo is None:  # naive = UTC, never the host's local zone
            now = now.replace(tzinfo=UTC)
        return now.timestamp()
    return float(now)


def to_datetime(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)


def describe(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


class Database:
    """One SQLite (``sqlite:///path/index.db``) or PostgreSQL (``postgresql+psycopg://…``) database:
    the engine, its dialect quirks, write/read transactions with retries and the read cache.

    The repositories of this package share one instance."""

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
        self.t = Schema()
        if backend == "sqlite":
            db = parsed.database
            if not db or db == ":memory:" or db.startswith("file::memory:"):
                raise InvalidArgument("the SQLite index needs a file: sqlite:///path/to/index.db")
            Path(db).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = sa.create_engine(
                parsed,
                echo=echo,
                pool_size=pool_size,
                max_overflow=max_overflow,
                connect_args={"check_same_thread": False, "timeout": busy_timeout_s},
            )
            self._install_sqlite_hooks(int(busy_timeout_s * 1000))
            self.write_lock: contextlib.AbstractContextManager[Any] = threading.Lock()
            self.pg = False
        elif backend == "postgresql":
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            self.engine = sa.create_engine(
                parsed, echo=echo, pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True
            )
            self.write_lock = contextlib.nullcontext()
            self.pg = True
        else:
            raise InvalidArgument(
                f"unsupported index URL {parsed.drivername!r}: use sqlite:///path/index.db or postgresql+psycopg://…"
            )
        self.insert = pg_dialect.insert if self.pg else sqlite_dialect.insert
        # Read cache of the hot listings (see cached): SQLite only, where this object is the
        # index's one writer, so every change bumps _generation.
        self._generation = 0
        self._generation_lock = threading.Lock()
        self._read_cache: dict[tuple[Any, ...], tuple[int, Any]] = {}
        # PostgreSQL change notification (see the module docstring and listen()).
        self._url = parsed
        self._listening = False
        self._listener: threading.Thread | None = None
        self._stop_listening = threading.Event()
        self._on_change: list[Callable[[], None]] = []

    @property
    def backend(self) -> str:
        """ "postgresql" or "sqlite"."""
        return "postgresql" if self.pg else "sqlite"

    def close(self) -> None:
        """Closes every pooled connection (tests and shutdown; PostgreSQL counts connections)."""
        self._stop_listening.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.join(LISTEN_POLL_SECONDS * 4)
        self.engine.dispose()

    # -- change notification ----------------------------------------------------------------

    @property
    def exclusive(self) -> bool:
        """Whether every change to the index is seen here: always on SQLite; on PostgreSQL
        while the LISTEN connection is up (see listen())."""
        return not self.pg or self._listening

    def on_change(self, callback: Callable[[], None]) -> None:
        """Calls ``callback()`` (from the listener thread; it must not block) after each change
        another process may have made (PostgreSQL notifications), and when ``exclusive``
        changes. Local writes are not reported here: their caller knows."""
        self._on_change.append(callback)

    def listen(self) -> None:
        """PostgreSQL: starts the listener thread (once). SQLite: nothing to do."""
        if self.pg and self._listener is None and not self._stop_listening.is_set():
            self._listener = threading.Thread(target=self._listen_loop, name="index-listen", daemon=True)
            self._listener.start()

    def _remote_change(self, listening: bool | None = None) -> None:
        with self._generation_lock:
            self._generation += 1
            if listening is not None:
                self._listening = listening
        for callback in list(self._on_change):
            try:
                callback()
            except Exception:  # noqa: BLE001 - a callback must never stop the listener
                _log.exception("index change callback failed")

    def _listen_loop(self) -> None:
        import psycopg  # the PostgreSQL driver: only where that backend is used

        conninfo = self._url.set(drivername="postgresql").render_as_string(hide_password=False)
        failures = 0
        while not self._stop_listening.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, application_name=LISTEN_APPLICATION) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self._remote_change(listening=True)
                    failures = 0
                    while not self._stop_listening.is_set():
                        for _ in conn.notifies(timeout=LISTEN_POLL_SECONDS):
                            self._remote_change()
                        conn.execute("SELECT 1")  # a dead connection raises here
            except Exception as e:  # noqa: BLE001 - any failure: reconnect with a backoff
                if failures == 0:
                    _log.warning("index LISTEN connection lost: nothing is cached until it is back: %s", describe(e))
            finally:
                if self._listening:
                    self._remote_change(listening=False)
            failures += 1
            self._stop_listening.wait(min(5.0, 0.1 * 2**failures))

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _install_sqlite_hooks(self, busy_ms: int) -> None:
        @sa.event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control away from pysqlite so that we can say BEGIN IMMEDIATE.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")  # first: switching to WAL may wait
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @sa.event.listens_for(self.engine, "begin")
        def _on_begin(conn: Connection) -> None:
            write = conn.get_execution_options().get("labelgrid_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    def _retryable(self, e: sa_exc.DBAPIError) -> bool:
        if e.connection_invalidated:
            return False  # the commit may have happened: never replay a write blindly
        if isinstance(e, sa_exc.IntegrityError):
            return True  # a create raced another (e.g. a row deleted under a lease insert)
        if self.pg:
            return getattr(e.orig, "sqlstate", None) in ("40001", "40P01")
        msg = str(e.orig).lower()
        return isinstance(e, sa_exc.OperationalError) and ("locked" in msg or "busy" in msg)

    def write(self, fn: Callable[[Connection], _T], what: str) -> _T:
        """Runs ``fn`` in one write transaction, retrying deadlocks and lost create races."""
        for attempt in range(self._max_attempts):
            try:
                with self.write_lock, self.engine.connect() as conn:
                    if not self.pg:
                        conn.execution_options(labelgrid_write=True)
                    try:
                        with conn.begin():
                            result = fn(conn)
                            if self.pg:  # delivered to listeners at commit (see listen())
                                conn.exec_driver_sql(f"NOTIFY {NOTIFY_CHANNEL}")
                            return result
                    finally:  # committed or not: cached reads taken before are no longer trusted
                        self._bump_generation()
            except LabelgridError:
                raise
            except sa_exc.DBAPIError as e:
                if attempt + 1 < self._max_attempts and self._retryable(e):
                    _log.debug("index %s: retrying after %s", what, describe(e))
                    time.sleep(random.uniform(0.001, 0.01) * (2**attempt))
                    continue
                raise StorageError(f"index {what} failed: {describe(e)}") from e
            except sa_exc.SQLAlchemyError as e:
                raise StorageError(f"index {what} failed: {describe(e)}") from e
        raise AssertionError("unreachable")

    def _bump_generation(self) -> None:
        with self._generation_lock:
            self._generation += 1

    def cached(self, key: tuple[Any, ...], compute: Callable[[], _T]) -> _T:
        """``compute()``, reused until the next change of the index.

        The generation is read before computing and the result kept under it; a write that
        commits meanwhile bumps it after its commit, so a result that may predate the write
        is never served. PostgreSQL may have other writers (replicas): cached only while
        their notifications are listened to (see listen())."""
        with self._generation_lock:
            generation = self._generation
            usable = self.exclusive
        if not usable:
            return compute()
        hit = self._read_cache.get(key)
        if hit is not None and hit[0] == generation:
            return hit[1]
        value = compute()
        self._read_cache[key] = (generation, value)
        return value

    def peek(self, key: tuple[Any, ...]) -> Any | None:
        """What ``cached`` would reuse for ``key`` now, else None (never blocks on the database)."""
        with self._generation_lock:
            generation = self._generation
            if not self.exclusive:
                return None
        hit = self._read_cache.get(key)
        return hit[1] if hit is not None and hit[0] == generation else None

    def read(self, fn: Callable[[Connection], _T], what: str) -> _T:
        """Runs ``fn`` in one read-only snapshot (several statements see the same data)."""
        try:
            with self.engine.connect() as conn:
                if self.pg:
                    conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    return fn(conn)
        except LabelgridError:
            raise
        except sa_exc.SQLAlchemyError as e:
            raise StorageError(f"index {what} failed: {describe(e)}") from e

    def insert_ignore(self, conn: Connection, table: sa.Table, values: dict[str, Any]) -> bool:
        """INSERT unless the key exists (race-free on both backends); True if inserted.

        RETURNING, not rowcount: SQLAlchemy 2.1 with psycopg reports -1 for INSERTs."""
        stmt = self.insert(table).values(**values).on_conflict_do_nothing()
        return conn.execute(stmt.returning(*table.primary_key.columns)).first() is not None

    def analyze(self) -> None:
        """Refreshes planner statistics after a large import: on a fresh PostgreSQL table
        the planner otherwise assumes it is empty and picks anti-joins over indexes."""
        try:
            with self.write_lock, self.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.exec_driver_sql("ANALYZE" if not self.pg else "ANALYZE images, labels, scores")
        except sa_exc.SQLAlchemyError as e:  # statistics are an optimisation only
            _log.warning("index ANALYZE failed: %s", describe(e))
