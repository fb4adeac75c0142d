"""The index's schema under Alembic, on SQLite and on a real PostgreSQL: created from nothing,
adopted from a database made before the migrations, and always equal to the tables the code
queries (autogenerate finds nothing to do)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from services.common.errors import StorageError
from services.datastore.adapters.index import ImageImport, SqlIndex
from services.datastore.adapters.index.migrate import ADOPTED_REVISION, alembic_config
from services.datastore.adapters.index.schema import Schema
from services.datastore.domain.model import ImageFilter

SHA = "a" * 64
HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


def engine(url: str) -> sa.Engine:
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def schema_diff(url: str) -> list[Any]:
    eng = engine(url)
    try:
        with eng.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Schema().metadata))
    finally:
        eng.dispose()


def revision(url: str) -> list[str]:
    eng = engine(url)
    try:
        with eng.connect() as conn:
            return list(MigrationContext.configure(conn).get_current_heads())
    finally:
        eng.dispose()


def make_pre_alembic(url: str, version: int) -> None:
    """A database as a datastore from before the migrations left it (create_all + schema_version),
    with two images, one of them finally labeled; version 1 lacks images.final."""
    eng = engine(url)
    t = Schema()
    try:
        with eng.begin() as conn:
            t.metadata.create_all(conn)
            conn.execute(sa.insert(t.meta).values(key="schema_version", value=str(version)))
            row = {
                "ext": ".nii.gz",
                "sha256": SHA,
                "size": 1,
                "info": {},
                "revision": 1,
                "create_time": 1.0,
                "update_time": 1.0,
            }
            images = [{**row, "id": "a", "rand": 0.1, "final": True}, {**row, "id": "b", "rand": 0.2, "final": False}]
            conn.execute(sa.insert(t.images), images)
            conn.execute(
                sa.insert(t.labels).values(image_id="a", tag="final", **{k: v for k, v in row.items() if k != "rand"})
            )
            if version == 1:
                for ix in ("ix_images_final_id", "ix_images_final_rand"):
                    conn.execute(sa.text(f"DROP INDEX {ix}"))
                conn.execute(sa.text("ALTER TABLE images DROP COLUMN final"))
    finally:
        eng.dispose()


def test_upgrade_from_empty(index_url: str) -> None:
    with SqlIndex(index_url) as index:
        index.bulk_import([ImageImport("x", ".nii.gz", SHA, 1, {})])
    assert revision(index_url) == [HEAD]
    assert schema_diff(index_url) == []
    with SqlIndex(index_url) as index:  # a second start changes nothing
        assert index.status().total == 1
    assert revision(index_url) == [HEAD]


@pytest.mark.parametrize("version", [1, 2])
def test_pre_alembic_database_is_adopted(index_url: str, version: int) -> None:
    make_pre_alembic(index_url, version)
    with SqlIndex(index_url) as index:
        assert index.status().total == 2
        unlabeled = index.list_images(filter=ImageFilter.UNLABELED).items
        assert [r.image_id for r in unlabeled] == ["b"]
    assert revision(index_url) == [HEAD]
    assert schema_diff(index_url) == []
    eng = engine(index_url)
    with eng.connect() as conn:
        assert conn.execute(sa.text("SELECT value FROM labelgrid_meta WHERE key = 'schema_version'")).scalar() == "2"
    eng.dispose()
    assert ADOPTED_REVISION in {r.revision for r in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def test_newer_databases_are_refused(index_url: str) -> None:
    SqlIndex(index_url).close()
    eng = engine(index_url)
    with eng.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'fffffffffff0'"))
    eng.dispose()
    with pytest.raises(StorageError, match="newer than this datastore"):
        SqlIndex(index_url)


def test_newer_pre_alembic_database_is_refused(index_url: str) -> None:
    make_pre_alembic(index_url, 3)
    with pytest.raises(StorageError, match="schema version 3"):
        SqlIndex(index_url)
    assert "alembic_version" not in sa.inspect(engine(index_url)).get_table_names()  # left untouched


def test_replicas_starting_together_create_the_schema_once(postgres_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            SqlIndex(postgres_url).close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert revision(postgres_url) == [HEAD]


def test_downgrade_and_upgrade_again(index_url: str) -> None:
    SqlIndex(index_url).close()
    eng = engine(index_url)
    with eng.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert set(sa.inspect(eng).get_table_names()) <= {"alembic_version"}
    eng.dispose()
    with SqlIndex(index_url) as index:
        assert index.status().total == 0
    assert schema_diff(index_url) == []


def test_upgrade_from_0001_adds_sessions(index_url: str) -> None:
    """A datastore at revision 0001 (before sessions were the datastore's) gains the sessions table."""
    eng = engine(index_url)
    with eng.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    assert "sessions" not in sa.inspect(eng).get_table_names()
    eng.dispose()
    with SqlIndex(index_url) as index:
        session = index.create_session(
            "s", owner="o", file_name="a.nii.gz", ext=".nii.gz", sha256=SHA, size=1, meta={},
            expiry_seconds=10, per_owner=1, total=1, now=100.0,
        )  # fmt: skip
        assert index.get_session("s", now=105.0) == session
    assert revision(index_url) == [HEAD]
    assert schema_diff(index_url) == []
