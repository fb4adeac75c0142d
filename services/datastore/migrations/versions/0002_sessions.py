"""Sessions (MONAI Label's /session/) become the datastore's own resource: the sessions table.

A database adopted from before the migrations may have it already (adoption creates every
table the schema names), so it is created only where missing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _key() -> sa.types.TypeEngine[str]:
    """Ids sort in plain byte order on both backends (collation "C" on PostgreSQL)."""
    return sa.String(200).with_variant(sa.String(200, collation="C"), "postgresql")


def upgrade() -> None:
    if "sessions" in sa.inspect(op.get_bind()).get_table_names():
        return
    C = sa.Column
    op.create_table(
        "sessions",
        C("id", _key(), primary_key=True),
        C("owner", sa.Text, nullable=False),
        C("file_name", sa.Text, nullable=False),
        C("ext", sa.String(64), nullable=False),
        C("sha256", sa.String(64), nullable=False),
        C("size", sa.BigInteger, nullable=False),
        C("meta", sa.JSON, nullable=False),
        C("expiry_seconds", sa.BigInteger, nullable=False),
        C("create_time", sa.Double, nullable=False),
        C("last_access_time", sa.Double, nullable=False),
        C("expire_time", sa.Double, nullable=False),
    )
    op.create_index("ix_sessions_expire", "sessions", ["expire_time"])
    op.create_index("ix_sessions_owner", "sessions", ["owner", "expire_time"])


def downgrade() -> None:
    op.drop_table("sessions")
