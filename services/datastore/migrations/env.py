"""Alembic's environment for the datastore index (services/datastore/adapters/index).

The datastore runs ``upgrade head`` itself when it opens the index (adapters/index/migrate.py),
inside its own write transaction, and passes that connection in ``config.attributes``.
By hand (a new migration after changing adapters/index/schema.py)::

    alembic -c services/datastore/migrations/alembic.ini -x url=sqlite:////tmp/index.db upgrade head
    alembic -c services/datastore/migrations/alembic.ini -x url=sqlite:////tmp/index.db \
        revision --autogenerate -m "what changed"
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Connection

from services.datastore.adapters.index.schema import Schema

config = context.config
target_metadata = Schema().metadata


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite's ALTER TABLE is limited
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("give the index URL: alembic ... -x url=sqlite:///path/index.db (or postgresql+psycopg://...)")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            run(conn)
            conn.commit()
    finally:
        engine.dispose()
