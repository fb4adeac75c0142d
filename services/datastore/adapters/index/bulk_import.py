"""Reindex: thousands of images and labels upserted or deleted in one transaction; clear()."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.datastore.adapters.index.base import (
    Repository,
    check_json,
)
from services.datastore.adapters.index.database import epoch
from services.datastore.adapters.index.schema import json_type
from services.datastore.domain.model import (
    DEFAULT_TAG_FINAL,
    ImageImport,
    LabelImport,
)
from services.datastore.domain.ports import BulkImportResult, Now


class BulkImport(Repository):
    def bulk_import(
        self, images: Iterable[ImageImport], labels: Iterable[LabelImport] = (), *, now: Now = None
    ) -> BulkImportResult:
        """Upserts thousands of images and labels in one transaction (reindex).

        Existing rows are updated only when their file facts or info differ (their
        revision then goes up); unchanged rows, leases and scores are left alone, so a
        reindex of an unchanged store is a no-op. Later duplicates win.
        """
        t = epoch(now)
        img_in = {i.image_id: i for i in images}
        lab_in = {(lab.image_id, lab.tag): lab for lab in labels}
        img_info = {k: check_json(v.info, f"info of image {k!r}") for k, v in img_in.items()}
        lab_info = {k: check_json(v.info, f"info of label {k[1]!r} of image {k[0]!r}") for k, v in lab_in.items()}
        im, lb = self._t.images, self._t.labels
        chunk = 500

        def tx(conn: Connection) -> BulkImportResult:
            self._lock_images(conn, [*img_in, *(image_id for image_id, _ in lab_in)])
            ids = list(img_in)
            old_imgs: dict[str, Any] = {}
            for i in range(0, len(ids), chunk):
                q = sa.select(im.c.id, im.c.ext, im.c.sha256, im.c.size, im.c.info, im.c.revision)
                for r in conn.execute(q.where(im.c.id.in_(ids[i : i + chunk]))):
                    old_imgs[r.id] = r
            inserts: list[dict[str, Any]] = []
            updates: list[dict[str, Any]] = []
            unchanged = 0
            for k, v in img_in.items():
                o = old_imgs.get(k)
                if o is None:
                    ct = t if v.create_time is None else float(v.create_time)
                    inserts.append(
                        {
                            "id": k,
                            "ext": v.ext,
                            "sha256": v.sha256,
                            "size": v.size,
                            "info": img_info[k],
                            "revision": 1,
                            "rand": random.random(),
                            "create_time": ct,
                            "update_time": t,
                        }
                    )
                elif (o.ext, o.sha256, o.size, o.info) != (v.ext, v.sha256, v.size, img_info[k]):
                    updates.append(
                        {
                            "b_id": k,
                            "b_ext": v.ext,
                            "b_sha": v.sha256,
                            "b_size": v.size,
                            "b_info": img_info[k],
                            "b_rev": o.revision + 1,
                            "b_t": t,
                        }
                    )
                else:
                    unchanged += 1
            if inserts:
                conn.execute(sa.insert(im), inserts)
            if updates:
                conn.execute(
                    sa.update(im)
                    .where(im.c.id == sa.bindparam("b_id"))
                    .values(
                        ext=sa.bindparam("b_ext"),
                        sha256=sa.bindparam("b_sha"),
                        size=sa.bindparam("b_size"),
                        info=sa.bindparam("b_info", type_=json_type()),
                        revision=sa.bindparam("b_rev"),
                        update_time=sa.bindparam("b_t"),
                    ),
                    updates,
                )
            # Labels: their images must be indexed (now, or already).
            need = sorted({k[0] for k in lab_in} - set(img_in))
            known = set(img_in)
            for i in range(0, len(need), chunk):
                known.update(conn.execute(sa.select(im.c.id).where(im.c.id.in_(need[i : i + chunk]))).scalars())
            old_labs: dict[tuple[str, str], Any] = {}
            lab_ids = sorted({k[0] for k in lab_in} & known)
            for i in range(0, len(lab_ids), chunk):
                q = sa.select(lb.c.image_id, lb.c.tag, lb.c.ext, lb.c.sha256, lb.c.size, lb.c.info, lb.c.revision)
                for lr in conn.execute(q.where(lb.c.image_id.in_(lab_ids[i : i + chunk]))):
                    old_labs[(lr.image_id, lr.tag)] = lr
            l_ins: list[dict[str, Any]] = []
            l_upd: list[dict[str, Any]] = []
            l_same, skipped = 0, 0
            for lk, lv in lab_in.items():
                if lk[0] not in known:
                    skipped += 1
                    continue
                lo = old_labs.get(lk)
                if lo is None:
                    l_ins.append(
                        {
                            "image_id": lk[0],
                            "tag": lk[1],
                            "ext": lv.ext,
                            "sha256": lv.sha256,
                            "size": lv.size,
                            "info": lab_info[lk],
                            "revision": 1,
                            "create_time": t,
                            "update_time": t,
                        }
                    )
                elif (lo.ext, lo.sha256, lo.size, lo.info) != (lv.ext, lv.sha256, lv.size, lab_info[lk]):
                    l_upd.append(
                        {
                            "b_id": lk[0],
                            "b_tag": lk[1],
                            "b_ext": lv.ext,
                            "b_sha": lv.sha256,
                            "b_size": lv.size,
                            "b_info": lab_info[lk],
                            "b_rev": lo.revision + 1,
                            "b_t": t,
                        }
                    )
                else:
                    l_same += 1
            if l_ins:
                conn.execute(sa.insert(lb), l_ins)
            if l_upd:
                conn.execute(
                    sa.update(lb)
                    .where((lb.c.image_id == sa.bindparam("b_id")) & (lb.c.tag == sa.bindparam("b_tag")))
                    .values(
                        ext=sa.bindparam("b_ext"),
                        sha256=sa.bindparam("b_sha"),
                        size=sa.bindparam("b_size"),
                        info=sa.bindparam("b_info", type_=json_type()),
                        revision=sa.bindparam("b_rev"),
                        update_time=sa.bindparam("b_t"),
                    ),
                    l_upd,
                )
            finals = [r["image_id"] for r in l_ins if r["tag"] == DEFAULT_TAG_FINAL]
            # A final label found by a reindex ends the image's lease, as a saved one does.
            for i in range(0, len(finals), chunk):
                conn.execute(sa.delete(self._t.leases).where(self._t.leases.c.image_id.in_(finals[i : i + chunk])))
            self._sync_final(conn, finals)
            changed = [r["id"] for r in inserts] + [r["b_id"] for r in updates]
            self._changed(conn, changed + [r["image_id"] for r in l_ins] + [r["b_id"] for r in l_upd])
            return BulkImportResult(
                images_added=len(inserts),
                images_updated=len(updates),
                images_unchanged=unchanged,
                labels_added=len(l_ins),
                labels_updated=len(l_upd),
                labels_unchanged=l_same,
                labels_skipped=skipped,
            )

        result = self._write(tx, "bulk_import")
        if result.images_added + result.labels_added >= 1000:
            self.db.analyze()
        return result

    def delete_images(self, image_ids: Iterable[str]) -> int:
        """Bulk delete for a reindex (entries whose files are gone); unknown ids are ignored."""
        ids = sorted(set(image_ids))
        im = self._t.images

        def tx(conn: Connection) -> int:
            self._lock_images(conn, ids)
            n = 0
            for i in range(0, len(ids), 500):
                n += conn.execute(sa.delete(im).where(im.c.id.in_(ids[i : i + 500]))).rowcount
            if n:
                self._changed(conn, ids)
            return n

        return self._write(tx, "delete_images")

    def delete_labels(self, keys: Iterable[tuple[str, str]]) -> int:
        """Bulk delete of (image_id, tag) labels for a reindex; unknown ones are ignored."""
        pairs = sorted(set(keys))
        lb = self._t.labels

        def tx(conn: Connection) -> int:
            self._lock_images(conn, [image_id for image_id, _ in pairs])
            n = 0
            for image_id, tag in pairs:
                n += conn.execute(sa.delete(lb).where((lb.c.image_id == image_id) & (lb.c.tag == tag))).rowcount
            self._sync_final(conn, [i for i, tag in pairs if tag == DEFAULT_TAG_FINAL])
            if n:
                self._changed(conn, [i for i, _ in pairs])
            return n

        return self._write(tx, "delete_labels")

    def clear(self, *, models: bool = False) -> None:
        """Empties images, labels, scores and leases (and, with ``models``, models and their
        versions). Records are never cleared: job history exists only in the index."""
        t = self._t

        def tx(conn: Connection) -> None:
            for table in (t.leases, t.scores, t.labels, t.images):
                conn.execute(sa.delete(table))
            self._changed_all(conn)
            if models:
                conn.execute(sa.delete(t.model_versions))
                conn.execute(sa.delete(t.models))

        self._write(tx, "clear")
