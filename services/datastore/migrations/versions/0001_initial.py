"""The index as the datastore created it before the migrations (labelgrid_meta schema_version 2).

A database created by such a datastore is adopted (stamped at this revision) rather than
created again: see adapters/index/migrate.py.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _key() -> sa.types.TypeEngine[str]:
    """Ids sort in plain byte order on both backends (collation "C" on PostgreSQL)."""
    return sa.String(200).with_variant(sa.String(200, collation="C"), "postgresql")


def upgrade() -> None:
    C = sa.Column
    meta = op.create_table(
        "labelgrid_meta",
        C("key", _key(), primary_key=True),
        C("value", sa.String(200), nullable=False),
    )
    op.create_table(
        "images",
        C("id", _key(), primary_key=True),
        C("ext", sa.String(64), nullable=False),
        C("sha256", sa.String(64), nullable=False),
        C("size", sa.BigInteger, nullable=False),
        C("info", sa.JSON, nullable=False),
        C("revision", sa.BigInteger, nullable=False),
        C("rand", sa.Double, nullable=False),
        C("final", sa.Boolean, nullable=False, server_default=sa.false()),
        C("create_time", sa.Double, nullable=False),
        C("update_time", sa.Double, nullable=False),
    )
    op.create_index("ix_images_rand", "images", ["rand", "id"])
    op.create_index("ix_images_final_id", "images", ["final", "id"])
    op.create_index("ix_images_final_rand", "images", ["final", "rand", "id"])
    op.create_table(
        "labels",
        C("image_id", _key(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        C("tag", _key(), primary_key=True),
        C("ext", sa.String(64), nullable=False),
        C("sha256", sa.String(64), nullable=False),
        C("size", sa.BigInteger, nullable=False),
        C("info", sa.JSON, nullable=False),
        C("revision", sa.BigInteger, nullable=False),
        C("create_time", sa.Double, nullable=False),
        C("update_time", sa.Double, nullable=False),
    )
    op.create_index("ix_labels_tag_image", "labels", ["tag", "image_id"])
    op.create_table(
        "scores",
        C("image_id", _key(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        C("key", _key(), primary_key=True),
        C("value", sa.Double, nullable=False),
        C("model_version", sa.Text, nullable=False),
        C("time", sa.Double, nullable=False),
    )
    op.create_index("ix_scores_key_value", "scores", ["key", sa.literal_column("value DESC"), "image_id"])
    op.create_table(
        "leases",
        C("image_id", _key(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        C("client_id", sa.Text, nullable=False),
        C("strategy", sa.Text, nullable=False),
        C("acquire_time", sa.Double, nullable=False),
        C("expire_time", sa.Double, nullable=False),
    )
    op.create_index("ix_leases_expire", "leases", ["expire_time"])
    op.create_index("ix_leases_client", "leases", ["client_id", "strategy"])
    op.create_table(
        "models",
        C("name", _key(), primary_key=True),
        C("pinned_version", _key(), nullable=True),
        C("last_seq", sa.BigInteger, nullable=False),
        C("create_time", sa.Double, nullable=False),
    )
    op.create_table(
        "model_versions",
        C("name", _key(), sa.ForeignKey("models.name", ondelete="CASCADE"), primary_key=True),
        C("version", _key(), primary_key=True),
        C("seq", sa.BigInteger, nullable=False),
        C("file_name", sa.Text, nullable=False),
        C("sha256", sa.String(64), nullable=False),
        C("size", sa.BigInteger, nullable=False),
        C("metrics", sa.JSON, nullable=False),
        C("info", sa.JSON, nullable=False),
        C("create_time", sa.Double, nullable=False),
        sa.UniqueConstraint("name", "seq", name="uq_model_versions_seq"),
    )
    op.create_table(
        "records",
        C("kind", _key(), primary_key=True),
        C("id", _key(), primary_key=True),
        C("data", sa.JSON, nullable=False),
        C("revision", sa.BigInteger, nullable=False),
        C("create_time", sa.Double, nullable=False),
        C("update_time", sa.Double, nullable=False),
    )
    # Datastores from before the migrations read this and refuse a version above 2.
    op.bulk_insert(meta, [{"key": "schema_version", "value": "2"}])


def downgrade() -> None:
    for table in ("records", "model_versions", "models", "leases", "scores", "labels", "images", "labelgrid_meta"):
        op.drop_table(table)
