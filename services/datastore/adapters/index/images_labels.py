"""Images, their labels and their scores: create, read, update, delete."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.errors import (
    AlreadyExists,
    InvalidArgument,
)
from services.datastore.adapters.index.base import (
    Repository,
    check_json,
    check_revision,
    image_not_found,
)
from services.datastore.adapters.index.database import epoch
from services.datastore.domain.model import (
    DEFAULT_TAG_FINAL,
    ImageRecord,
    LabelRecord,
)
from services.datastore.domain.ports import Now


class ImagesLabels(Repository):
    # ------------------------------------------------------------------ images

    def upsert_image(
        self,
        image_id: str,
        ext: str,
        sha256: str,
        size: int,
        info: Mapping[str, Any] | None = None,
        *,
        fail_if_exists: bool = False,
        now: Now = None,
    ) -> ImageRecord:
        """Adds an image, or replaces an existing one's file facts and info.

        Re-upload keeps the image's labels and lease (MONAI Label drops the label entries
        but keeps the label files, which its next reconcile adopts again: keeping them is
        that end state without the window where they vanish) and its create time; the
        info is replaced as MONAI Label does, and the scores are dropped when the
        content changed, because they were computed on the old bytes.
        """
        info_ = check_json(info or {}, "image info")
        t = epoch(now)
        images = self._t.images

        def tx(conn: Connection) -> ImageRecord:
            values = {
                "id": image_id,
                "ext": ext,
                "sha256": sha256,
                "size": size,
                "info": info_,
                "revision": 1,
                "rand": random.random(),
                "create_time": t,
                "update_time": t,
            }
            if not self._insert_ignore(conn, images, values):
                old = self._require_image_row(conn, image_id, lock=True)
                if fail_if_exists:
                    raise AlreadyExists(f"image {image_id!r} already exists")
                conn.execute(
                    sa.update(images)
                    .where(images.c.id == image_id)
                    .values(ext=ext, sha256=sha256, size=size, info=info_, revision=old.revision + 1, update_time=t)
                )
                if old.sha256 != sha256:
                    conn.execute(sa.delete(self._t.scores).where(self._t.scores.c.image_id == image_id))
            self._changed(conn, [image_id])
            return self._load_image(conn, image_id)

        return self._write(tx, "upsert_image")

    def get_image(self, image_id: str) -> ImageRecord:
        """The image with its labels and scores; NOT_FOUND (IMAGE_NOT_FOUND) if unknown."""
        return self._read(lambda conn: self._load_image(conn, image_id), "get_image")

    def delete_image(self, image_id: str) -> ImageRecord:
        """Removes the image; its labels, scores and lease go with it (ON DELETE CASCADE)."""

        def tx(conn: Connection) -> ImageRecord:
            self._require_image_row(conn, image_id, lock=True)
            rec = self._load_image(conn, image_id)
            conn.execute(sa.delete(self._t.images).where(self._t.images.c.id == image_id))
            self._changed(conn, [image_id])
            return rec

        return self._write(tx, "delete_image")

    def update_image_info(
        self,
        image_id: str,
        info: Mapping[str, Any],
        *,
        replace: bool = False,
        expected_revision: int | None = None,
        now: Now = None,
    ) -> ImageRecord:
        """Shallow-merges ``info`` into the image info (MONAI Label's update_image_info).

        The row is locked (or the database write-locked) across read-merge-write, so
        concurrent writers merging different keys never lose each other. A falsy
        ``expected_revision`` (None or 0, as the proto's "unset") means unconditional.
        """
        info_ = check_json(info, "image info")
        t = epoch(now)
        images = self._t.images

        def tx(conn: Connection) -> ImageRecord:
            old = self._require_image_row(conn, image_id, lock=True)
            check_revision(expected_revision, old.revision, f"image {image_id!r}")
            merged = info_ if replace else {**(old.info or {}), **info_}
            conn.execute(
                sa.update(images)
                .where(images.c.id == image_id)
                .values(info=merged, revision=old.revision + 1, update_time=t)
            )
            self._changed(conn, [image_id])
            return self._load_image(conn, image_id)

        return self._write(tx, "update_image_info")

    # ------------------------------------------------------------------ labels

    def upsert_label(
        self,
        image_id: str,
        tag: str,
        ext: str,
        sha256: str,
        size: int,
        info: Mapping[str, Any] | None = None,
        *,
        now: Now = None,
    ) -> LabelRecord:
        """Saves a label (info replaced, as MONAI Label's save_label); a "final" label releases the image's lease."""
        info_ = check_json(info or {}, "label info")
        t = epoch(now)
        labels = self._t.labels

        def tx(conn: Connection) -> LabelRecord:
            # Lock the image first: every writer touching an image's labels or lease takes
            # this lock first, so a lease acquirer sees the label once it holds the image.
            self._require_image_row(conn, image_id, lock=True)
            key = (labels.c.image_id == image_id) & (labels.c.tag == tag)
            # One statement, not a read then an insert or update: a label row that a bulk writer
            # (reindex's delete_labels, bulk_import) deletes or inserts between a read and a
            # write would make the write miss it or collide with it. (On PostgreSQL the bulk
            # writers also lock their images first, since a8eba66, against deadlocks.)
            stmt = self._insert(labels).values(
                image_id=image_id, tag=tag, ext=ext, sha256=sha256, size=size, info=info_,
                revision=1, create_time=t, update_time=t,
            )  # fmt: skip
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[labels.c.image_id, labels.c.tag],
                    set_={
                        "ext": stmt.excluded.ext, "sha256": stmt.excluded.sha256, "size": stmt.excluded.size,
                        "info": stmt.excluded.info, "revision": labels.c.revision + 1,
                        "update_time": stmt.excluded.update_time,
                    },
                )
            )  # fmt: skip
            if tag == DEFAULT_TAG_FINAL:
                conn.execute(sa.delete(self._t.leases).where(self._t.leases.c.image_id == image_id))
                conn.execute(sa.update(self._t.images).where(self._t.images.c.id == image_id).values(final=True))
            self._changed(conn, [image_id])
            return self._label_record(conn.execute(sa.select(labels).where(key)).one())

        return self._write(tx, "upsert_label")

    def get_label(self, image_id: str, tag: str) -> LabelRecord:
        """NOT_FOUND (LABEL_NOT_FOUND) if the image has no label under ``tag``."""
        return self._read(lambda conn: self._label_record(self._label_row(conn, image_id, tag)), "get_label")

    def find_label(self, image_id: str, tag: str) -> LabelRecord | None:
        """The label under ``tag``, None if the image has none; NOT_FOUND (IMAGE_NOT_FOUND) if the
        image is unknown. One statement: a label save's check, before anything is stored."""
        images, labels = self._t.images, self._t.labels
        q = (
            sa.select(images.c.id.label("known_image"), labels)
            .select_from(images.outerjoin(labels, (labels.c.image_id == images.c.id) & (labels.c.tag == tag)))
            .where(images.c.id == image_id)
        )

        def read(conn: Connection) -> LabelRecord | None:
            row = conn.execute(q).first()
            if row is None:
                raise image_not_found(image_id)
            return None if row.tag is None else self._label_record(row)

        return self._read(read, "find_label")

    def delete_label(self, image_id: str, tag: str) -> LabelRecord:
        labels = self._t.labels

        def tx(conn: Connection) -> LabelRecord:
            if tag == DEFAULT_TAG_FINAL:  # same lock order as upsert_label: image first
                self._require_image_row(conn, image_id, lock=True)
            rec = self._label_record(self._label_row(conn, image_id, tag, lock=True))
            conn.execute(sa.delete(labels).where((labels.c.image_id == image_id) & (labels.c.tag == tag)))
            if tag == DEFAULT_TAG_FINAL:
                conn.execute(sa.update(self._t.images).where(self._t.images.c.id == image_id).values(final=False))
            self._changed(conn, [image_id])
            return rec

        return self._write(tx, "delete_label")

    def update_label_info(
        self,
        image_id: str,
        tag: str,
        info: Mapping[str, Any],
        *,
        replace: bool = False,
        expected_revision: int | None = None,
        now: Now = None,
    ) -> LabelRecord:
        """Shallow-merges into a label's info; same guarantees as ``update_image_info``."""
        info_ = check_json(info, "label info")
        t = epoch(now)
        labels = self._t.labels

        def tx(conn: Connection) -> LabelRecord:
            old = self._label_row(conn, image_id, tag, lock=True)
            check_revision(expected_revision, old.revision, f"label {tag!r} of image {image_id!r}")
            merged = info_ if replace else {**(old.info or {}), **info_}
            key = (labels.c.image_id == image_id) & (labels.c.tag == tag)
            conn.execute(sa.update(labels).where(key).values(info=merged, revision=old.revision + 1, update_time=t))
            self._changed(conn, [image_id])
            return self._label_record(conn.execute(sa.select(labels).where(key)).one())

        return self._write(tx, "update_label_info")

    # ------------------------------------------------------------------ scores

    def set_score(
        self,
        image_id: str,
        key: str,
        value: float,
        model_version: str = "",
        *,
        info: Mapping[str, Any] | None = None,
        now: Now = None,
    ) -> None:
        """Stores a score; ``info`` (e.g. {"epistemic_entropy": v, "epistemic_ts": ts}) is
        shallow-merged into the image info in the same transaction, as MONAI Label keeps
        scores in the info."""
        value = float(value)
        if math.isnan(value):
            raise InvalidArgument(f"score {key!r} of image {image_id!r} is NaN")
        info_ = check_json(info, "image info") if info else None
        t = epoch(now)
        sc, im = self._t.scores, self._t.images

        def tx(conn: Connection) -> None:
            row = self._require_image_row(conn, image_id, lock=True)
            stmt = self._insert(sc).values(image_id=image_id, key=key, value=value, model_version=model_version, time=t)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[sc.c.image_id, sc.c.key],
                    set_={"value": value, "model_version": model_version, "time": t},
                )
            )
            if info_:
                conn.execute(
                    sa.update(im)
                    .where(im.c.id == image_id)
                    .values(info={**(row.info or {}), **info_}, revision=row.revision + 1, update_time=t)
                )
                self._changed(conn, [image_id])

        self._write(tx, "set_score")

    def get_scores(self, image_id: str) -> dict[str, float]:
        sc = self._t.scores

        def tx(conn: Connection) -> dict[str, float]:
            self._require_image_row(conn, image_id)
            q = sa.select(sc.c.key, sc.c.value).where(sc.c.image_id == image_id).order_by(sc.c.key)
            return {r.key: r.value for r in conn.execute(q)}

        return self._read(tx, "get_scores")
