"""MONAI Label 0.8.5's ``datastore_v2.json`` model of the whole index, and its JSON bytes
(GET /datastore/?output=all, and the local folder's file), kept and patched image by image.

The bytes are kept as one JSON fragment per image (``"id":{"image":…,"labels":…}``, in id
order). After a change only the images the change log names (schema ``change_log`` and
``image_changes``, written in the same transaction as every image, label and info write) are
rendered again, and the fragments joined: the answer right after a change costs the changed
images plus one join, not a rebuild of every image. The log is read in the same snapshot as
the fragments it names, so a write is either in both or in neither (it is then seen by the
next call: on SQLite from the log's next number, on PostgreSQL, where writers commit in any
order, from the oldest transaction still running when the snapshot was taken). Where the log
cannot answer (nothing kept yet: startup; a clear or a large reindex, which ask for a
rebuild; a database whose log went backwards) or most images changed, everything is rendered
again, by the same code, so a patched answer is byte for byte the rebuilt one
(``rebuild_monailabel_json``; tests/unit/test_export_patch.py).
"""

from __future__ import annotations

import bisect
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.datastore.adapters.index.base import (
    Repository,
)
from services.datastore.adapters.index.database import Database

_Hidden = tuple[str, str]  # (hidden_id_prefix, hidden_info_key); ("", "") hides nothing
_KEPT_VARIANTS = 4  # hidden-image variants kept at once (the gateway's and the folder's file)
_PATCH_MAX_FRACTION = 4  # more changed images than 1/4 of all: render everything again
_IN_CHUNK = 500
_PATCH_IN_PLACE = 64  # up to this many changed images, each is put in place by bisection

# SQLite: one statement renders each image's fragment inside the database (the stored info
# text is never turned into Python objects). Labels come in primary-key order (image_id, tag),
# so each object's tags are sorted; json_insert adds ts and name where the info lacks them,
# as export_monailabel_model does.
_SQLITE_FRAGMENTS = """
    SELECT i.id, json_quote(i.id) || ':' || json_object(
        'image', json_object('ext', i.ext, 'info', json_insert(json(i.info),
            '$.ts', CAST(i.create_time AS INTEGER), '$.name', i.id || i.ext)),
        'labels', json((SELECT coalesce(json_group_object(l.tag, json_object('ext', l.ext,
            'info', json_insert(json(l.info), '$.ts', CAST(l.create_time AS INTEGER),
            '$.name', l.image_id || l.ext))), '{}')
            FROM labels AS l WHERE l.image_id = i.id)))
    FROM images AS i WHERE_CLAUSE ORDER BY i.id
"""
# PostgreSQL: the log's reset numbers and this snapshot's horizon (the oldest transaction id
# still running when it was taken), in one row whether or not change_log's row exists.
_PG_POSITION = sa.text(
    "SELECT (SELECT seq FROM change_log WHERE id = 1) AS seq, "
    "(SELECT reset_seq FROM change_log WHERE id = 1) AS reset_seq, "
    "CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS text) AS bigint) AS horizon"
)
_SQLITE_HIDDEN = "NOT (substr(i.id, 1, :plen) = :prefix AND coalesce(json_type(i.info, :path), '') = 'true')"


@dataclass
class _Kept:
    """One variant's fragments, in id order, as of change number ``seq`` (PostgreSQL: of
    every transaction below ``horizon``, see ``Export._since_pg``)."""

    seq: int
    reset_seq: int
    ids: list[str]
    fragments: list[bytes]
    head: bytes = b""
    body: bytes = b""  # head + fragments joined + tail, as last returned
    horizon: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class _Read:
    """What one snapshot said: the log's position and either every fragment (``full``) or
    the changed ids with the fragments of those still shown (absent: deleted or hidden)."""

    seq: int
    reset_seq: int
    full: bool
    changed: Sequence[str] = ()
    rows: Sequence[tuple[str, bytes]] = ()
    horizon: int = 0


class Export(Repository):
    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self._kept: OrderedDict[_Hidden, _Kept] = OrderedDict()
        self._kept_lock = threading.Lock()
        self.full_builds = 0  # whole renders (startup, resets): tests tell patches from rebuilds
        self.patches = 0  # answers patched from the change log

    def export_monailabel_model(self, name: str = "new-dataset", description: str = "New Dataset") -> dict[str, Any]:
        """The whole index as MONAI Label 0.8.5's ``datastore_v2.json`` model (one snapshot).

        Objects are keyed by image id in id order. ``ts`` and ``name`` are filled in when an
        info lacks them (MONAI Label always has them; images registered without them would
        otherwise confuse MONAI Label readers); the stored info is not changed.
        """

        def tx(conn: Connection) -> dict[str, Any]:
            return {
                "name": name,
                "description": description,
                "images_dir": ".",
                "labels_dir": "labels",
                "objects": self._objects(conn, None),
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
        ``GET /datastore/?output=all`` answer.

        Kept until the next change; after one, patched from the change log (see the module
        docstring). On PostgreSQL the kept answer is served without reading the log only
        while the index listens to the other replicas' writes (Database.listen); otherwise
        each call reads the log's position (one row) and patches what changed.
        """
        key = ("export_monailabel_json", name, description, hidden_id_prefix, hidden_info_key)
        return self._cached(key, lambda: self._current(name, description, (hidden_id_prefix, hidden_info_key)))

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

    def rebuild_monailabel_json(
        self,
        name: str = "new-dataset",
        description: str = "New Dataset",
        *,
        hidden_id_prefix: str = "",
        hidden_info_key: str = "",
    ) -> bytes:
        """``export_monailabel_json()`` rendered whole from one snapshot, keeping nothing
        (what every patched answer must equal, byte for byte)."""
        hidden = (hidden_id_prefix, hidden_info_key)
        rows = self._read(lambda conn: self._fragments(conn, hidden, None), "export_monailabel_json")
        return _join(_head(name, description), [fragment for _, fragment in rows])

    # -- kept fragments ------------------------------------------------------------------

    def _variant(self, hidden: _Hidden) -> _Kept | None:
        with self._kept_lock:
            kept = self._kept.get(hidden)
            if kept is not None:
                self._kept.move_to_end(hidden)
            return kept

    def _current(self, name: str, description: str, hidden: _Hidden) -> bytes:
        """The kept answer brought up to the log's position (patched, or rebuilt whole)."""
        kept = self._variant(hidden)
        if kept is None:
            return self._rebuild(name, description, hidden)
        with kept.lock:
            read = self._read(lambda conn: self._since(conn, hidden, kept), "export_monailabel_json")
            if read.full:
                kept.ids = [image_id for image_id, _ in read.rows]
                kept.fragments = [fragment for _, fragment in read.rows]
                kept.body = b""
                self.full_builds += 1
            elif read.changed:
                _apply(kept, read.changed, read.rows)
                kept.body = b""
                self.patches += 1
            kept.seq, kept.reset_seq, kept.horizon = read.seq, read.reset_seq, read.horizon
            head = _head(name, description)
            if not kept.body or kept.head != head:
                kept.head, kept.body = head, _join(head, kept.fragments)
            return kept.body

    def _rebuild(self, name: str, description: str, hidden: _Hidden) -> bytes:
        read = self._read(lambda conn: self._since(conn, hidden, None), "export_monailabel_json")
        kept = _kept_from(read, name, description)
        self._store(hidden, kept)
        self.full_builds += 1
        return kept.body

    def _store(self, hidden: _Hidden, kept: _Kept) -> None:
        with self._kept_lock:
            self._kept[hidden] = kept
            self._kept.move_to_end(hidden)
            while len(self._kept) > _KEPT_VARIANTS:
                self._kept.popitem(last=False)

    def _since(self, conn: Connection, hidden: _Hidden, kept: _Kept | None) -> _Read:
        """One snapshot: the log's position, then what changed after ``kept`` (all of it
        when ``kept`` is None or the log cannot say)."""
        if self._pg:
            return self._since_pg(conn, hidden, kept)
        cl, ic = self._t.change_log, self._t.image_changes
        row = conn.execute(sa.select(cl.c.seq, cl.c.reset_seq).where(cl.c.id == 1)).first()
        seq, reset_seq = (int(row.seq), int(row.reset_seq)) if row is not None else (0, 0)
        if kept is not None and reset_seq == kept.reset_seq and seq >= kept.seq:
            changed: list[str] = []
            if seq > kept.seq:  # the log moved on since kept
                changed = list(conn.execute(sa.select(ic.c.image_id).where(ic.c.seq > kept.seq)).scalars())
            return self._patch(conn, hidden, kept, changed, seq, reset_seq)
        return _Read(seq, reset_seq, full=True, rows=self._fragments(conn, hidden, None))

    def _since_pg(self, conn: Connection, hidden: _Hidden, kept: _Kept | None) -> _Read:
        """``_since`` on PostgreSQL, whose writers number each change by their transaction id
        and commit in any order. A change this snapshot does not see belongs to a transaction
        still running or not begun, whose id is at least the snapshot's xmin (its horizon):
        reading again from that horizon misses none (and renders a few images twice, which
        changes nothing). change_log's numbers move on resets, and when a datastore of before
        this scheme writes (a rolling upgrade): then everything is rendered again."""
        ic = self._t.image_changes
        row = conn.execute(_PG_POSITION).one()
        seq, reset_seq, horizon = int(row.seq or 0), int(row.reset_seq or 0), int(row.horizon)
        if kept is not None and (seq, reset_seq) == (kept.seq, kept.reset_seq):
            changed = list(conn.execute(sa.select(ic.c.image_id).where(ic.c.seq >= kept.horizon)).scalars())
            return self._patch(conn, hidden, kept, changed, seq, reset_seq, horizon)
        return _Read(seq, reset_seq, full=True, rows=self._fragments(conn, hidden, None), horizon=horizon)

    def _patch(
        self,
        conn: Connection,
        hidden: _Hidden,
        kept: _Kept,
        changed: list[str],
        seq: int,
        reset_seq: int,
        horizon: int = 0,
    ) -> _Read:
        """The images the log names since ``kept``, to patch it with; everything again when most changed."""
        if len(changed) * _PATCH_MAX_FRACTION > max(len(kept.ids), 64):
            return _Read(seq, reset_seq, full=True, rows=self._fragments(conn, hidden, None), horizon=horizon)
        rows = self._fragments(conn, hidden, changed) if changed else ()
        return _Read(seq, reset_seq, full=False, changed=changed, rows=rows, horizon=horizon)

    # -- rendering -----------------------------------------------------------------------

    def _fragments(self, conn: Connection, hidden: _Hidden, ids: Sequence[str] | None) -> list[tuple[str, bytes]]:
        """(id, ``"id":{…}`` UTF-8) of the shown images among ``ids`` (None: all), in id order."""
        if self._pg:
            objects = self._objects(conn, ids)
            prefix, info_key = hidden
            return [
                (image_id, (_dumps(image_id) + ":" + _dumps(obj)).encode())
                for image_id, obj in objects.items()
                if not (
                    prefix and info_key and image_id.startswith(prefix) and obj["image"]["info"].get(info_key) is True
                )
            ]
        where: list[str] = []
        params: dict[str, Any] = {}
        if hidden[0] and hidden[1]:
            where.append(_SQLITE_HIDDEN)
            params = {"plen": len(hidden[0]), "prefix": hidden[0], "path": "$." + json.dumps(hidden[1])}
        if ids is None:
            q = sa.text(_SQLITE_FRAGMENTS.replace("WHERE_CLAUSE", "WHERE " + where[0] if where else ""))
            return [(r[0], r[1].encode()) for r in conn.execute(q.bindparams(**params))]
        q = sa.text(
            _SQLITE_FRAGMENTS.replace("WHERE_CLAUSE", "WHERE " + " AND ".join(["i.id IN :ids", *where]))
        ).bindparams(sa.bindparam("ids", expanding=True), **params)
        out: list[tuple[str, bytes]] = []
        for chunk in _chunks(sorted(ids)):
            out.extend((r[0], r[1].encode()) for r in conn.execute(q, {"ids": chunk}))
        return out

    def _objects(self, conn: Connection, ids: Sequence[str] | None) -> dict[str, Any]:
        """The model's objects of ``ids`` (None: all), in id order, ts and name filled in."""
        im, lb = self._t.images, self._t.labels
        objects: dict[str, Any] = {}
        label_rows: list[Any] = []
        image_q = sa.select(im.c.id, im.c.ext, im.c.info, im.c.create_time).order_by(im.c.id)
        label_q = sa.select(lb.c.image_id, lb.c.tag, lb.c.ext, lb.c.info, lb.c.create_time)
        label_q = label_q.order_by(lb.c.image_id, lb.c.tag)
        if ids is None:
            image_rows: list[Any] = list(conn.execute(image_q))
            label_rows = list(conn.execute(label_q))
        else:
            image_rows = []
            for chunk in _chunks(sorted(ids)):
                image_rows.extend(conn.execute(image_q.where(im.c.id.in_(chunk))))
                label_rows.extend(conn.execute(label_q.where(lb.c.image_id.in_(chunk))))
        for r in image_rows:
            info = dict(r.info or {})
            info.setdefault("ts", int(r.create_time))
            info.setdefault("name", f"{r.id}{r.ext}")
            objects[r.id] = {"image": {"ext": r.ext, "info": info}, "labels": {}}
        for lr in label_rows:
            obj = objects.get(lr.image_id)
            if obj is None:  # cannot happen (FK), but never export a dangling label
                continue
            info = dict(lr.info or {})
            info.setdefault("ts", int(lr.create_time))
            info.setdefault("name", f"{lr.image_id}{lr.ext}")
            obj["labels"][lr.tag] = {"ext": lr.ext, "info": info}
        return objects


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _head(name: str, description: str) -> bytes:
    head = _dumps({"name": name, "description": description, "images_dir": ".", "labels_dir": "labels"})
    return (head[:-1] + ',"objects":{').encode()


def _join(head: bytes, fragments: list[bytes]) -> bytes:
    """head + fragments comma-separated + "}}", copied once (a join of the joined fragments
    would copy the whole answer twice)."""
    if not fragments:
        return head + b"}}"
    parts = list(fragments)  # pointers only
    parts[0] = head + parts[0]
    parts[-1] = parts[-1] + b"}}"
    return b",".join(parts)


def _chunks(ids: Sequence[str]) -> Iterable[list[str]]:
    for i in range(0, len(ids), _IN_CHUNK):
        yield list(ids[i : i + _IN_CHUNK])


def _kept_from(read: _Read, name: str, description: str) -> _Kept:
    head = _head(name, description)
    fragments = [fragment for _, fragment in read.rows]
    return _Kept(
        seq=read.seq,
        reset_seq=read.reset_seq,
        horizon=read.horizon,
        ids=[image_id for image_id, _ in read.rows],
        fragments=fragments,
        head=head,
        body=_join(head, fragments),
    )


def _apply(kept: _Kept, changed: Sequence[str], rows: Sequence[tuple[str, bytes]]) -> None:
    """Replaces, inserts or removes the changed images' fragments, keeping id order."""
    new = dict(rows)
    if len(changed) > _PATCH_IN_PLACE:  # one pass over all (inserting one by one moves the tail each time)
        merged = dict(zip(kept.ids, kept.fragments, strict=True))
        for image_id in changed:
            merged.pop(image_id, None)
        merged.update(new)
        kept.ids = sorted(merged)  # nearly sorted already: a few runs for timsort
        kept.fragments = [merged[image_id] for image_id in kept.ids]
        return
    ids, fragments = kept.ids, kept.fragments
    for image_id in sorted(set(changed)):
        i = bisect.bisect_left(ids, image_id)
        present = i < len(ids) and ids[i] == image_id
        fragment = new.get(image_id)
        if fragment is None:
            if present:
                del ids[i]
                del fragments[i]
        elif present:
            fragments[i] = fragment
        else:
            ids.insert(i, image_id)
            fragments.insert(i, fragment)
