"""The index's tables: one definition, used by the queries and by the Alembic migrations.

Changing a table means a new migration under ``services/datastore/migrations/versions``
(``tests/unit/test_datastore_migrations.py`` fails while the two differ).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

SCHEMA_VERSION = 2  # 2: images.final (labelgrid_meta; kept for datastores older than the migrations)
KEY_LEN = 200  # ids.MAX_ID_LENGTH


def key_type() -> sa.types.TypeEngine[str]:
    """Ids sort in plain byte order (Python's order, MONAI Label's ``first``) on both backends."""
    return sa.String(KEY_LEN).with_variant(sa.String(KEY_LEN, collation="C"), "postgresql")


def json_type() -> sa.types.TypeEngine[Any]:
    # Plain JSON (not JSONB) on PostgreSQL: nothing queries inside it, and JSON keeps the
    # key order MONAI Label wrote, which datastore_v2.json readers see.
    return sa.JSON()


class Schema:
    """The tables; built per index instance (no module-level metadata registry)."""

    def __init__(self) -> None:
        md = self.metadata = sa.MetaData()
        C = sa.Column
        self.meta = sa.Table(
            "labelgrid_meta",
            md,
            C("key", key_type(), primary_key=True),
            C("value", sa.String(200), nullable=False),
        )
        self.images = sa.Table(
            "images",
            md,
            C("id", key_type(), primary_key=True),
            C("ext", sa.String(64), nullable=False),
            C("sha256", sa.String(64), nullable=False),
            C("size", sa.BigInteger, nullable=False),
            C("info", json_type(), nullable=False),
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
            C("image_id", key_type(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
            C("tag", key_type(), primary_key=True),
            C("ext", sa.String(64), nullable=False),
            C("sha256", sa.String(64), nullable=False),
            C("size", sa.BigInteger, nullable=False),
            C("info", json_type(), nullable=False),
            C("revision", sa.BigInteger, nullable=False),
            C("create_time", sa.Double, nullable=False),
            C("update_time", sa.Double, nullable=False),
        )
        sa.Index("ix_labels_tag_image", self.labels.c.tag, self.labels.c.image_id)
        self.scores = sa.Table(
            "scores",
            md,
            C("image_id", key_type(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
            C("key", key_type(), primary_key=True),
            C("value", sa.Double, nullable=False),
            C("model_version", sa.Text, nullable=False),
            C("time", sa.Double, nullable=False),
        )
        # Serves "highest score first, ties by id" as one index range scan.
        sa.Index("ix_scores_key_value", self.scores.c.key, self.scores.c.value.desc(), self.scores.c.image_id)
        self.leases = sa.Table(
            "leases",
            md,
            C("image_id", key_type(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
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
            C("name", key_type(), primary_key=True),
            C("pinned_version", key_type(), nullable=True),
            # Highest sequence number handed out; never decreases, so "v000007" is never reused.
            C("last_seq", sa.BigInteger, nullable=False),
            C("create_time", sa.Double, nullable=False),
        )
        self.model_versions = sa.Table(
            "model_versions",
            md,
            C("name", key_type(), sa.ForeignKey("models.name", ondelete="CASCADE"), primary_key=True),
            C("version", key_type(), primary_key=True),
            C("seq", sa.BigInteger, nullable=False),
            C("file_name", sa.Text, nullable=False),
            C("sha256", sa.String(64), nullable=False),
            C("size", sa.BigInteger, nullable=False),
            C("metrics", json_type(), nullable=False),
            C("info", json_type(), nullable=False),
            C("create_time", sa.Double, nullable=False),
            sa.UniqueConstraint("name", "seq", name="uq_model_versions_seq"),
        )
        self.records = sa.Table(
            "records",
            md,
            C("kind", key_type(), primary_key=True),
            C("id", key_type(), primary_key=True),
            C("data", json_type(), nullable=False),
            C("revision", sa.BigInteger, nullable=False),
            C("create_time", sa.Double, nullable=False),
            C("update_time", sa.Double, nullable=False),
        )
        # MONAI Label's sessions (migration 0002): a volume under sessions/ per row, expired
        # by expire_time (the purge walks ix_sessions_expire; the caps count by owner).
        self.sessions = sa.Table(
            "sessions",
            md,
            C("id", key_type(), primary_key=True),
            C("owner", sa.Text, nullable=False),
            C("file_name", sa.Text, nullable=False),
            C("ext", sa.String(64), nullable=False),
            C("sha256", sa.String(64), nullable=False),
            C("size", sa.BigInteger, nullable=False),
            C("meta", json_type(), nullable=False),
            C("expiry_seconds", sa.BigInteger, nullable=False),
            C("create_time", sa.Double, nullable=False),
            C("last_access_time", sa.Double, nullable=False),
            C("expire_time", sa.Double, nullable=False),
        )
        sa.Index("ix_sessions_expire", self.sessions.c.expire_time)
        sa.Index("ix_sessions_owner", self.sessions.c.owner, self.sessions.c.expire_time)
        # The change log of MONAI Label's datastore JSON (migration 0003; adapters/index/export.py
        # patches its kept JSON from it): every write to an image, its labels or its info records
        # a number against the image in image_changes, in the same transaction; a deleted image's
        # row stays as its tombstone. SQLite takes the next number from change_log's one row
        # (its one writer commits in number order); PostgreSQL writes the transaction's id and
        # locks nothing shared, and readers stop at the oldest transaction still running. A
        # write too large to log per image (clear, a big reindex) bumps change_log's reset_seq
        # instead: rebuild everything.
        self.change_log = sa.Table(
            "change_log",
            md,
            C("id", sa.Integer, primary_key=True, autoincrement=False),
            C("seq", sa.BigInteger, nullable=False),
            C("reset_seq", sa.BigInteger, nullable=False),
        )
        self.image_changes = sa.Table(
            "image_changes",
            md,
            C("image_id", key_type(), primary_key=True),
            C("seq", sa.BigInteger, nullable=False),
        )
        sa.Index("ix_image_changes_seq", self.image_changes.c.seq)
