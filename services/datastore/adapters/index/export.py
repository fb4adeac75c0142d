"""MONAI Label 0.8.5's ``datastore_v2.json`` model of the whole index, and its cached JSON
bytes (GET /datastore/?output=all answered in one read).
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.datastore.adapters.index.base import (
    Repository,
)


class Export(Repository):
    def export_monailabel_model(self, name: str = "new-dataset", description: str = "New Dataset") -> dict[str, Any]:
        """The whole index as MONAI Label 0.8.5's ``datastore_v2.json`` model (one snapshot).

        Objects are keyed by image id in id order. ``ts`` and ``name`` are filled in when an
        info lacks them (MONAI Label always has them; images registered without them would
        otherwise confuse MONAI Label readers); the stored info is not changed.
        """
        im, lb = self._t.images, self._t.labels

        def tx(conn: Connection) -> dict[str, Any]:
            objects: dict[str, Any] = {}
            for r in conn.execute(sa.select(im.c.id, im.c.ext, im.c.info, im.c.create_time).order_by(im.c.id)):
                info = dict(r.info or {})
                info.setdefault("ts", int(r.create_time))
                info.setdefault("name", f"{r.id}{r.ext}")
                objects[r.id] = {"image": {"ext": r.ext, "info": info}, "labels": {}}
            q = sa.select(lb.c.image_id, lb.c.tag, lb.c.ext, lb.c.info, lb.c.create_time)
            q = q.order_by(lb.c.image_id, lb.c.tag)
            for lr in conn.execute(q):
                obj = objects.get(lr.image_id)
                if obj is None:  # cannot happen (FK), but never export a dangling label
                    continue
                info = dict(lr.info or {})
                info.setdefault("ts", int(lr.create_time))
                info.setdefault("name", f"{lr.image_id}{lr.ext}")
                obj["labels"][lr.tag] = {"ext": lr.ext, "info": info}
            return {
                "name": name,
                "description": description,
                "images_dir": ".",
                "labels_dir": "labels",
                "objects": objects,
            }

        return self._read(tx, "export_monailabel_model")

    def export_monailabel_json(
        self,
        name: str = "new-dataset",
        description: str = "New Dataset",
        *,
        hidden_id_prefix: str = "",
        hidden_info_key: str = "",
    ) -> bytes:
        """``export_monailabel_model`` already serialised, as FastAPI would send it (compact
        separators, UTF-8), leaving out the images ``_hidden`` names: MONAI Label's
        ``GET /datastore/?output=all`` answer in one read.

        On SQLite one statement builds every object's JSON inside the database (the stored
        info text is never turned into Python objects); PostgreSQL goes through Python.
        """
        head = json.dumps(
            {"name": name, "description": description, "images_dir": ".", "labels_dir": "labels"},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        head = head[:-1] + ',"objects":{'
        hidden = self._hidden(hidden_id_prefix, hidden_info_key)
        key = ("export_monailabel_json", name, description, hidden_id_prefix, hidden_info_key)
        if self._pg:

            def through_python() -> bytes:
                model = self.export_monailabel_model(name, description)
                if hidden is not None:
                    model["objects"] = {
                        k: v
                        for k, v in model["objects"].items()
                        if not (k.startswith(hidden_id_prefix) and v["image"]["info"].get(hidden_info_key) is True)
                    }
                return json.dumps(model, separators=(",", ":"), ensure_ascii=False).encode()

            # Kept while the index listens to other replicas' writes (Database.listen).
            return self._cached(key, through_python)
        # Labels come in primary-key order (image_id, tag), so each object's tags are sorted;
        # json_insert adds ts and name where the info lacks them, as export_monailabel_model.
        sql = """
            SELECT json_quote(i.id) || ':' || json_object(
                'image', json_object('ext', i.ext, 'info', json_insert(json(i.info),
                    '$.ts', CAST(i.create_time AS INTEGER), '$.name', i.id || i.ext)),
                'labels', json((SELECT coalesce(json_group_object(l.tag, json_object('ext', l.ext,
                    'info', json_insert(json(l.info), '$.ts', CAST(l.create_time AS INTEGER),
                    '$.name', l.image_id || l.ext))), '{}')
                    FROM labels AS l WHERE l.image_id = i.id)))
            FROM images AS i WHERE_HIDDEN ORDER BY i.id
        """
        where = ""
        params: dict[str, Any] = {}
        if hidden is not None:
            where = "WHERE NOT (substr(i.id, 1, :plen) = :prefix AND coalesce(json_type(i.info, :path), '') = 'true')"
            params = {
                "plen": len(hidden_id_prefix),
                "prefix": hidden_id_prefix,
                "path": "$." + json.dumps(hidden_info_key),
            }
        q = sa.text(sql.replace("WHERE_HIDDEN", where)).bindparams(**params)

        def tx(conn: Connection) -> bytes:
            body = ",".join(conn.execute(q).scalars())
            return (head + body + "}}").encode()

        return self._cached(key, lambda: self._read(tx, "export_monailabel_json"))

    def export_monailabel_json_if_cached(
        self,
        name: str = "new-dataset",
        description: str = "New Dataset",
        *,
        hidden_id_prefix: str = "",
        hidden_info_key: str = "",
    ) -> bytes | None:
        """``export_monailabel_json()`` if it is answered from the cache, else None."""
        return self._peek(("export_monailabel_json", name, description, hidden_id_prefix, hidden_info_key))
