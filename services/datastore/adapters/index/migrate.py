"""Creates or upgrades the index's schema when a datastore opens it."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.errors import StorageError
from services.datastore.adapters.index.database import Database
from services.datastore.adapters.index.schema import SCHEMA_VERSION
from services.datastore.domain.model import DEFAULT_TAG_FINAL


def init_schema(db: Database) -> None:
    t = db.t

    def tx(conn: Connection) -> None:
        if db.pg:  # replicas starting together must not race create_all
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7426133)"))
        t.metadata.create_all(conn, checkfirst=True)
        meta = t.meta
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
            for ix in t.images.indexes:
                ix.create(conn, checkfirst=True)
            lb, im = t.labels, t.images
            final = sa.exists().where((lb.c.tag == DEFAULT_TAG_FINAL) & (lb.c.image_id == im.c.id))
            conn.execute(sa.update(im).values(final=final))
            conn.execute(sa.update(meta).where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION)))

    db.write(tx, "initialisation")
