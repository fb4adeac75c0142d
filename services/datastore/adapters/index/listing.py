"""Listings and counts of images: keyset pages in id, score or random order; status()."""

from __future__ import annotations

import random
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from services.common.errors import (
    InvalidArgument,
)
from services.common.paging import DEFAULT_PAGE_SIZE
from services.common.paging import page_size as _check_page_size
from services.datastore.adapters.index.base import (
    Repository,
    decode_token,
    encode_token,
    keys_fit,
)
from services.datastore.adapters.index.database import epoch
from services.datastore.domain.model import (
    DEFAULT_TAG_FINAL,
    DatastoreStatus,
    ImageFilter,
    ImageOrder,
    ImageRecord,
    Page,
)
from services.datastore.domain.ports import Now


class Listing(Repository):
    def list_images(
        self,
        *,
        filter: ImageFilter = ImageFilter.ALL,
        tag: str = DEFAULT_TAG_FINAL,
        order: ImageOrder = ImageOrder.ID,
        score_key: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        exclude_leased: bool = False,
        now: Now = None,
    ) -> Page[ImageRecord]:
        """One page of images (with labels and scores), keyset-paginated.

        SCORE_DESC lists the images that have ``score_key`` by value (ties by id), then
        the images without it by id: nothing is left out. RANDOM is a random rotation of
        a fixed random permutation (the start is drawn on the first page and kept in the
        token), so paging through it still yields every image exactly once.
        ``total_size`` counts every image matching the filter.
        """
        size = _check_page_size(page_size)
        tag = tag or DEFAULT_TAG_FINAL
        sig = {"f": filter.value, "t": tag, "o": order.value, "s": score_key or "", "x": bool(exclude_leased)}
        tok = decode_token(page_token, "images")
        if tok is not None:
            if any(tok.get(k) != v for k, v in sig.items()):
                raise InvalidArgument("invalid page_token: it belongs to a listing with other parameters")
            seg_i, last, r0 = tok.get("i"), tok.get("l"), tok.get("r")
            if not isinstance(seg_i, int) or not isinstance(last, list) or not (r0 is None or isinstance(r0, float)):
                raise InvalidArgument("invalid page_token")
        else:
            seg_i, last = 0, None
            r0 = random.random() if order is ImageOrder.RANDOM else None
        segs = self._segments(order, score_key, r0)
        if not 0 <= seg_i < len(segs) or (last is not None and not keys_fit(segs[seg_i].cols, last)):
            raise InvalidArgument("invalid page_token")
        t = epoch(now)
        im = self._t.images
        base: list[sa.ColumnElement[bool]] = []
        if filter is ImageFilter.LABELED:
            base.append(self._has_label(tag))
        elif filter is ImageFilter.UNLABELED:
            base.append(self._lacks_label(tag))
        if exclude_leased:
            base.append(~self._has_live_lease(t))

        def tx(conn: Connection) -> Page[ImageRecord]:
            total = conn.execute(sa.select(sa.func.count()).select_from(im).where(*base)).scalar_one()
            got: list[tuple[int, Row[Any]]] = []
            i, lst = seg_i, last
            while i < len(segs) and len(got) <= size:
                want = size + 1 - len(got)
                rows = conn.execute(self._segment_query(segs[i], base, lst, want, list(im.c))).all()
                got.extend((i, r) for r in rows)
                if len(rows) < want:
                    i, lst = i + 1, None
            token = ""
            if len(got) > size:
                got = got[:size]
                end_i, end_row = got[-1]
                keys = [getattr(end_row, f"k{j}") for j in range(len(segs[end_i].cols))]
                token = encode_token("images", {**sig, "i": end_i, "l": keys, "r": r0})
            items = self._images_from_rows(conn, [r for _, r in got])
            return Page(items=items, next_page_token=token, total_size=total)

        return self._read(tx, "list_images")

    def status(self, *, hidden_id_prefix: str = "", hidden_info_key: str = "") -> DatastoreStatus:
        """MONAI Label's status(): image count, images with a final label, labels per tag.

        Images matching ``hidden_id_prefix`` + ``hidden_info_key`` (see ``_hidden``) and
        their labels are not counted."""
        im, lb = self._t.images, self._t.labels
        hidden = self._hidden(hidden_id_prefix, hidden_info_key)

        def tx(conn: Connection) -> DatastoreStatus:
            q_total = sa.select(sa.func.count()).select_from(im)
            q_tags = sa.select(lb.c.tag, sa.func.count().label("n")).group_by(lb.c.tag).order_by(lb.c.tag)
            if hidden is not None:
                q_total = q_total.where(~hidden)
                hidden_ids = sa.select(im.c.id).where(hidden)
                q_tags = q_tags.where(
                    ~(
                        (sa.func.substr(lb.c.image_id, 1, len(hidden_id_prefix)) == hidden_id_prefix)
                        & lb.c.image_id.in_(hidden_ids)
                    )
                )
            total = conn.execute(q_total).scalar_one()
            tags = {r.tag: r.n for r in conn.execute(q_tags)}
            # (image_id, tag) is the primary key: one final label per image at most.
            return DatastoreStatus(total=total, completed=tags.get(DEFAULT_TAG_FINAL, 0), label_tags=tags)

        status = self._cached(("status", hidden_id_prefix, hidden_info_key), lambda: self._read(tx, "status"))
        return DatastoreStatus(status.total, status.completed, dict(status.label_tags))

    def status_if_cached(self, *, hidden_id_prefix: str = "", hidden_info_key: str = "") -> DatastoreStatus | None:
        """``status()`` if it is answered from the cache (no database access), else None."""
        status = self._peek(("status", hidden_id_prefix, hidden_info_key))
        return None if status is None else DatastoreStatus(status.total, status.completed, dict(status.label_tags))
