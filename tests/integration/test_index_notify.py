"""PostgreSQL change notification (services.datastore.adapters.index.database): every write
transaction NOTIFYs, each index LISTENs, and the read cache is used only while it listens.
Two indexes on one real (embedded) PostgreSQL database stand for two datastore replicas."""

from __future__ import annotations

import psycopg

from services.datastore.adapters.index import SqlIndex
from services.datastore.adapters.index.database import LISTEN_APPLICATION
from tests.fixtures.polling import wait_until
from tests.fixtures.postgres import PostgresServer

SHA = "0" * 64


def test_another_replicas_write_invalidates_the_cache_and_is_told(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    a, b = SqlIndex(postgres_url), SqlIndex(postgres_url)
    try:
        seen: list[bool] = []  # exclusive() at each callback
        exclusive = a.listen(lambda: seen.append(exclusive()))
        wait_until(exclusive, "A listening")
        assert a.status().total == 0
        assert a.status_if_cached() is not None  # kept while it listens
        assert b'"objects":{}' in a.export_monailabel_json()
        assert a.export_monailabel_json_if_cached() is not None
        told = len(seen)

        b.upsert_image("b1", ".nii.gz", SHA, 1)  # B's write, never through A
        wait_until(lambda: len(seen) > told, "A told of B's write")
        assert a.status_if_cached() is None  # what A kept is dropped
        assert a.export_monailabel_json_if_cached() is None
        assert a.status().total == 1
        assert b'"b1"' in a.export_monailabel_json()
        assert b.status_if_cached() is None  # B does not listen: nothing kept there

        # A's own writes notify too (B could listen), and A sees them at once.
        a.upsert_image("a1", ".nii.gz", SHA, 1)
        assert a.status().total == 2

        # The LISTEN connection dies: A says it is not exclusive (nothing kept), then reconnects.
        told = len(seen)
        with psycopg.connect(postgres_server.admin_conninfo(), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                (LISTEN_APPLICATION,),
            )
        wait_until(lambda: False in seen[told:], "A noticing the lost connection")
        wait_until(lambda: seen[-1] is True and exclusive(), "A listening again")
        b.upsert_image("b2", ".nii.gz", SHA, 1)
        wait_until(lambda: a.status().total == 3, "A seeing B's write after the reconnect")
    finally:
        a.close()
        b.close()


def test_sqlite_needs_no_listener(tmp_path) -> None:  # type: ignore[no-untyped-def]
    index = SqlIndex(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        exclusive = index.listen(lambda: None)
        assert exclusive()
        index.upsert_image("x", ".nii.gz", SHA, 1)
        assert index.status().total == 1
        assert index.status_if_cached() is not None
    finally:
        index.close()
