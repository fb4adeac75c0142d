"""Brings the index's schema to the newest Alembic revision when a datastore opens it.

The migrations live in ``services/datastore/migrations`` (revision 0001 is the schema as
datastores created it before Alembic). At startup, in one write transaction (PostgreSQL:
under an advisory lock, so replicas starting together take turns):

- an empty database is upgraded from nothing;
- a database created by a datastore from before the migrations (``labelgrid_meta`` but no
  ``alembic_version``) is adopted: a schema version 1 gets its old hand-written upgrade to
  version 2 first, then the database is stamped at 0001, exactly the schema it already has;
- then ``upgrade head`` runs the migrations it lacks.

A database at a revision this datastore does not know (a newer datastore migrated it) is
refused with StorageError rather than touched.
"""

from __future__ import annotations

import threading
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy.engine import Connection

from services.common.errors import StorageError
from services.datastore.adapters.index.database import Database
from services.datastore.adapters.index.schema import SCHEMA_VERSION, Schema
from services.datastore.domain.model import DEFAULT_TAG_FINAL

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
ADOPTED_REVISION = "0001"  # the schema every datastore before the migrations created
_PG_LOCK = 7426133
# Alembic's commands go through one module-level `context` proxy: one command at a time per
# process (always taken last, inside the database's own write lock, so no lock cycle).
_COMMAND_LOCK = threading.Lock()


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the index; with ``connection``, env.py runs on it."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(db: Database) -> None:
    """Creates, adopts or upgrades the schema (see the module docstring)."""
    script = ScriptDirectory.from_config(alembic_config())

    def tx(conn: Connection) -> None:
        if db.pg:
            conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({_PG_LOCK})"))
        tables = set(sa.inspect(conn).get_table_names())
        if "alembic_version" not in tables and "labelgrid_meta" in tables:
            _adopt(conn, db.t)
            with _COMMAND_LOCK:
                command.stamp(alembic_config(conn), ADOPTED_REVISION)
        current = MigrationContext.configure(conn).get_current_heads()
        unknown = [rev for rev in current if not _known(script, rev)]
        if unknown:
            raise StorageError(
                f"the index is at schema revision {', '.join(unknown)}, newer than this datastore understands "
                f"(head {script.get_current_head()}); upgrade the datastore"
            )
        with _COMMAND_LOCK:
            command.upgrade(alembic_config(conn), "head")

    db.write(tx, "schema upgrade")


def _known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except (CommandError, RevisionError):  # unknown, or an ambiguous prefix
        return False


def _adopt(conn: Connection, t: Schema) -> None:
    """A pre-migrations index: refuse a newer one, bring version 1 to 2 (the old in-place step)."""
    t.metadata.create_all(conn, checkfirst=True)  # as those datastores did: tables added since
    meta = t.meta
    row = conn.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).first()
    version = int(row.value) if row is not None else SCHEMA_VERSION
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"the index has schema version {version}, newer than this datastore understands "
            f"({SCHEMA_VERSION}); upgrade the datastore"
        )
    if version < 2:
        conn.exec_driver_sql("ALTER TABLE images ADD COLUMN final BOOLEAN NOT NULL DEFAULT false")
        for ix in t.images.indexes:
            ix.create(conn, checkfirst=True)
        lb, im = t.labels, t.images
        final = sa.exists().where((lb.c.tag == DEFAULT_TAG_FINAL) & (lb.c.image_id == im.c.id))
        conn.execute(sa.update(im).values(final=final))
    if row is None:
        conn.execute(sa.insert(meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
    else:
        conn.execute(sa.update(meta).where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION)))
