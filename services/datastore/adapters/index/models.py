"""Model versions: numbered publishing, pinning (rollback), deletion."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
)
from services.common.paging import DEFAULT_PAGE_SIZE
from services.common.paging import page_size as _check_page_size
from services.datastore.adapters.index.base import (
    Repository,
    check_json,
    decode_token,
    encode_token,
)
from services.datastore.adapters.index.database import epoch
from services.datastore.domain.model import (
    ModelRecord,
    ModelVersionRecord,
    Page,
)
from services.datastore.domain.ports import Now


class Models(Repository):
    def add_model_version(
        self,
        name: str,
        version: str | None,
        file_name: str,
        sha256: str,
        size: int,
        metrics: Mapping[str, Any] | None = None,
        info: Mapping[str, Any] | None = None,
        *,
        now: Now = None,
    ) -> ModelVersionRecord:
        """Publishes a version; ``version=None`` takes the next "v000001"-style number.

        Numbers come from a per-model counter updated under the model row's lock, so
        concurrent publishers get distinct, increasing versions; a number is never reused
        after a delete. An explicit version that exists is ALREADY_EXISTS.
        """
        metrics_ = check_json(metrics or {}, "model metrics")
        info_ = check_json(info or {}, "model info")
        t = epoch(now)
        m, mv = self._t.models, self._t.model_versions

        def tx(conn: Connection) -> ModelVersionRecord:
            self._insert_ignore(conn, m, {"name": name, "pinned_version": None, "last_seq": 0, "create_time": t})
            seq = conn.execute(sa.select(m.c.last_seq).where(m.c.name == name).with_for_update()).scalar_one() + 1

            def exists(v: str) -> bool:
                q = sa.select(mv.c.seq).where((mv.c.name == name) & (mv.c.version == v))
                return conn.execute(q).first() is not None

            if version is None:
                while exists(v := f"v{seq:06d}"):
                    seq += 1
            elif exists(v := version):
                raise AlreadyExists(f"model version {name!r}/{version!r} already exists")
            conn.execute(
                sa.insert(mv).values(
                    name=name,
                    version=v,
                    seq=seq,
                    file_name=file_name,
                    sha256=sha256,
                    size=size,
                    metrics=metrics_,
                    info=info_,
                    create_time=t,
                )
            )
            conn.execute(sa.update(m).where(m.c.name == name).values(last_seq=seq))
            return self._version_record(
                conn.execute(sa.select(mv).where((mv.c.name == name) & (mv.c.version == v))).one()
            )

        return self._write(tx, "add_model_version")

    def get_model(self, name: str) -> ModelRecord:
        """A model (any model that ever had a version); NOT_FOUND (MODEL_NOT_FOUND) otherwise."""
        return self._read(lambda conn: self._model_record(conn, name), "get_model")

    def list_models(self, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "") -> Page[ModelRecord]:
        size = _check_page_size(page_size)
        tok = decode_token(page_token, "models")
        after = tok.get("n") if tok else None
        if tok is not None and not isinstance(after, str):
            raise InvalidArgument("invalid page_token")
        m = self._t.models

        def tx(conn: Connection) -> Page[ModelRecord]:
            total = conn.execute(sa.select(sa.func.count()).select_from(m)).scalar_one()
            q = sa.select(m.c.name, m.c.pinned_version, self._latest_version_expr().label("latest"))
            if after is not None:
                q = q.where(m.c.name > after)
            rows = conn.execute(q.order_by(m.c.name).limit(size + 1)).all()
            token = ""
            if len(rows) > size:
                rows = rows[:size]
                token = encode_token("models", {"n": rows[-1].name})
            items = [ModelRecord(model=r.name, latest_version=r.latest, pinned_version=r.pinned_version) for r in rows]
            return Page(items=items, next_page_token=token, total_size=total)

        return self._read(tx, "list_models")

    def list_model_versions(
        self, name: str, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> Page[ModelVersionRecord]:
        """Versions newest first; NOT_FOUND if the model is unknown."""
        size = _check_page_size(page_size)
        tok = decode_token(page_token, "versions")
        after = tok.get("s") if tok else None
        if tok is not None and (not isinstance(after, int) or tok.get("m") != name):
            raise InvalidArgument("invalid page_token")
        mv = self._t.model_versions

        def tx(conn: Connection) -> Page[ModelVersionRecord]:
            self._model_record(conn, name)
            total = conn.execute(sa.select(sa.func.count()).select_from(mv).where(mv.c.name == name)).scalar_one()
            q = sa.select(mv).where(mv.c.name == name)
            if after is not None:
                q = q.where(mv.c.seq < after)
            rows = conn.execute(q.order_by(mv.c.seq.desc()).limit(size + 1)).all()
            token = ""
            if len(rows) > size:
                rows = rows[:size]
                token = encode_token("versions", {"m": name, "s": rows[-1].seq})
            return Page(items=[self._version_record(r) for r in rows], next_page_token=token, total_size=total)

        return self._read(tx, "list_model_versions")

    def get_model_version(self, name: str, version: str) -> ModelVersionRecord:
        return self._read(
            lambda conn: self._version_record(self._version_row(conn, name, version)), "get_model_version"
        )

    def delete_model_version(self, name: str, version: str) -> ModelVersionRecord:
        """FAILED_PRECONDITION if the version is pinned (unpin first)."""
        mv = self._t.model_versions

        def tx(conn: Connection) -> ModelVersionRecord:
            model = self._model_record(conn, name, lock=True)
            rec = self._version_record(self._version_row(conn, name, version))
            if model.pinned_version == version:
                raise FailedPrecondition(f"model version {name!r}/{version!r} is pinned; unpin it before deleting")
            conn.execute(sa.delete(mv).where((mv.c.name == name) & (mv.c.version == version)))
            return rec

        return self._write(tx, "delete_model_version")

    def pin_model_version(self, name: str, version: str | None) -> ModelRecord:
        """Pins the served version (rollback); None unpins (serve the latest)."""
        m = self._t.models

        def tx(conn: Connection) -> ModelRecord:
            self._model_record(conn, name, lock=True)
            if version:
                self._version_row(conn, name, version)
            conn.execute(sa.update(m).where(m.c.name == name).values(pinned_version=version or None))
            return self._model_record(conn, name)

        return self._write(tx, "pin_model_version")
