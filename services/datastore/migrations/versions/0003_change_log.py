"""The change log of MONAI Label's datastore JSON: change_log (one row: the last sequence
number handed out, and the last one that asked for a whole rebuild) and image_changes (per
image, the number of its last change; a deleted image's row is its tombstone).

A database adopted from before the migrations may have the tables already (adoption creates
every table the schema names), so they are created only where missing; the one row is
inserted where missing. Existing images need no rows: a datastore builds its JSON whole when
it starts, and patches it from the log only afterwards.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _key() -> sa.types.TypeEngine[str]:
    """Ids sort in plain byte order on both backends (collation "C" on PostgreSQL)."""
    return sa.String(200).with_variant(sa.String(200, collation="C"), "postgresql")


def upgrade() -> None:
    bind = op.get_bind()
    tables = set(sa.inspect(bind).get_table_names())
    C = sa.Column
    if "change_log" not in tables:
        op.create_table(
            "change_log",
            C("id", sa.Integer, primary_key=True, autoincrement=False),
            C("seq", sa.BigInteger, nullable=False),
            C("reset_seq", sa.BigInteger, nullable=False),
        )
    if "image_changes" not in tables:
        op.create_table(
            "image_changes",
            C("image_id", _key(), primary_key=True),
            C("seq", sa.BigInteger, nullable=False),
        )
        op.create_index("ix_image_changes_seq", "image_changes", ["seq"])
    if bind.execute(sa.text("SELECT count(*) FROM change_log WHERE id = 1")).scalar() == 0:
        bind.execute(sa.text("INSERT INTO change_log (id, seq, reset_seq) VALUES (1, 0, 0)"))


def downgrade() -> None:
    op.drop_table("image_changes")
    op.drop_table("change_log")
