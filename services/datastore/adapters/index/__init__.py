"""The datastore's SQL index: every piece of metadata, behind one small synchronous API.

Blobs live in the object store; this index holds what must be queried and updated
transactionally. It runs on SQLite (embedded default, one file) or on PostgreSQL (several
datastore replicas share it), through SQLAlchemy 2 Core. The package is small repositories
over one ``Database`` (engine, transactions, retries, read cache; its docstring states how
writes stay correct under concurrency on each backend):

- ``schema``: the tables; ``migrate``: creates, adopts or upgrades them at startup with
  Alembic (the migrations are in ``services/datastore/migrations``);
- ``images_labels``: images, labels, scores; ``listing``: pages and counts of images;
- ``leases``: next-sample leases; ``models``: model versions; ``records``: JSON records;
- ``sessions``: MONAI Label's sessions, with their expiry and caps;
- ``export``: MONAI Label's datastore_v2.json model and its JSON, patched from the change log
  every image write records (``base.Repository._changed``); ``bulk_import``: reindex.

``SqlIndex`` composes them into the ``Index`` port of ``services.datastore.domain.ports``.
Every method is thread-safe (one pooled connection per call) and returns the plain types of
``services.datastore.domain.model``; driver errors surface as ``StorageError``.
"""

from __future__ import annotations

from collections.abc import Callable

from services.datastore.adapters.index.bulk_import import BulkImport
from services.datastore.adapters.index.database import Database
from services.datastore.adapters.index.export import Export
from services.datastore.adapters.index.images_labels import ImagesLabels
from services.datastore.adapters.index.leases import Leases
from services.datastore.adapters.index.listing import Listing
from services.datastore.adapters.index.migrate import upgrade
from services.datastore.adapters.index.models import Models
from services.datastore.adapters.index.records import Records
from services.datastore.adapters.index.sessions import Sessions
from services.datastore.domain.model import ImageImport, LabelImport
from services.datastore.domain.ports import BulkImportResult, NoLeaseReason, Now


class SqlIndex:
    """Metadata index on SQLite (``sqlite:///path/index.db``) or PostgreSQL (``postgresql+psycopg://…``).

    Opening it creates the schema, or upgrades an older one. The public methods are the
    repositories' own (bound here once, so each is defined in exactly one place).
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 5,
        max_overflow: int = 15,
        busy_timeout_s: float = 30.0,
        max_attempts: int = 5,
        echo: bool = False,
    ) -> None:
        db = self.db = Database(
            url,
            pool_size=pool_size,
            max_overflow=max_overflow,
            busy_timeout_s=busy_timeout_s,
            max_attempts=max_attempts,
            echo=echo,
        )
        try:
            upgrade(db)
        except BaseException:
            db.close()
            raise

        images = ImagesLabels(db)
        self.upsert_image = images.upsert_image
        self.get_image = images.get_image
        self.delete_image = images.delete_image
        self.update_image_info = images.update_image_info
        self.upsert_label = images.upsert_label
        self.get_label = images.get_label
        self.find_label = images.find_label
        self.delete_label = images.delete_label
        self.update_label_info = images.update_label_info
        self.set_score = images.set_score
        self.get_scores = images.get_scores

        listing = Listing(db)
        self.list_images = listing.list_images
        self.status = listing.status
        self.status_if_cached = listing.status_if_cached

        leases = Leases(db)
        self.acquire_next_lease = leases.acquire_next_lease
        self.no_lease_reason = leases.no_lease_reason
        self.renew_lease = leases.renew_lease
        self.release_lease = leases.release_lease
        self.list_leases = leases.list_leases
        self.expire_leases = leases.expire_leases

        models = Models(db)
        self.add_model_version = models.add_model_version
        self.get_model = models.get_model
        self.list_models = models.list_models
        self.list_model_versions = models.list_model_versions
        self.get_model_version = models.get_model_version
        self.delete_model_version = models.delete_model_version
        self.pin_model_version = models.pin_model_version

        records = Records(db)
        self.put_record = records.put_record
        self.get_record = records.get_record
        self.list_records = records.list_records
        self.delete_record = records.delete_record

        sessions = Sessions(db)
        self.create_session = sessions.create_session
        self.get_session = sessions.get_session
        self.touch_session = sessions.touch_session
        self.delete_session = sessions.delete_session
        self.expired_sessions = sessions.expired_sessions
        self.remove_expired_session = sessions.remove_expired_session
        self.session_ids = sessions.session_ids

        export = self.exporter = Export(db)  # its full_builds / patches counters: tests
        self.export_monailabel_model = export.export_monailabel_model
        self.export_monailabel_json = export.export_monailabel_json
        self.export_monailabel_json_if_cached = export.export_monailabel_json_if_cached

        bulk = BulkImport(db)
        self.bulk_import = bulk.bulk_import
        self.delete_images = bulk.delete_images
        self.delete_labels = bulk.delete_labels
        self.clear = bulk.clear

    @property
    def backend(self) -> str:
        """ "postgresql" or "sqlite"."""
        return self.db.backend

    def listen(self, on_change: Callable[[], None]) -> Callable[[], bool]:
        """Calls ``on_change()`` after each change another process may have made (PostgreSQL's
        LISTEN/NOTIFY, see Database; SQLite has no other writer) and returns what says whether
        every change is seen now (``Database.exclusive``)."""
        self.db.on_change(on_change)
        self.db.listen()
        return lambda: self.db.exclusive

    def close(self) -> None:
        """Closes every pooled connection (tests and shutdown; PostgreSQL counts connections)."""
        self.db.close()

    def __enter__(self) -> SqlIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["BulkImportResult", "ImageImport", "LabelImport", "NoLeaseReason", "Now", "SqlIndex"]
