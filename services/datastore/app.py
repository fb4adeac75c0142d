"""Builds the datastore from its settings: the one place that picks the adapters."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from services.datastore.adapters.blobs import LocalBlobStore, S3BlobStore
from services.datastore.adapters.dicomweb import DicomwebPacs, parse_search_filter
from services.datastore.adapters.dicomweb_store import PacsDatastore
from services.datastore.adapters.index import SqlIndex
from services.datastore.adapters.monailabel_json import JsonMirror, read_monailabel_json
from services.datastore.domain.datastore import Datastore
from services.datastore.domain.ports import BlobStore
from services.datastore.settings import DatastoreSettings


def build_datastore(settings: DatastoreSettings, *, clock: Callable[[], float] = time.time) -> Datastore:
    """A ready datastore; the caller closes it. Adopts an existing folder or bucket on first use.

    `clock` (epoch seconds) is what leases' info stamps and sessions' expiry are judged by."""
    if settings.backend == "dicomweb":
        return build_pacs_datastore(settings)
    if settings.backend == "local":
        root = settings.root.resolve()
        blobs: BlobStore = LocalBlobStore(root)
        index_url = settings.index or f"sqlite:///{root / '.labelgrid' / 'index.db'}"
        location = str(root)
    else:
        blobs = S3BlobStore(
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key,
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            secure=settings.s3_secure,
            region=settings.s3_region or None,
            create_bucket=settings.s3_create_bucket,
            spool_root=settings.state_dir / "spool",
            public_endpoint=settings.s3_public_endpoint,
        )
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        index_url = settings.index or f"sqlite:///{settings.state_dir.resolve() / 'index.db'}"
        location = f"s3://{settings.s3_bucket}/{settings.s3_prefix}"
    index = SqlIndex(index_url)
    mirror = None
    legacy: Callable[[], dict[str, Any] | None] = lambda: None  # noqa: E731
    if settings.backend == "local":
        # Keep MONAI Label's own datastore_v2.json current, so MONAI Label still opens the folder.
        # The bytes GET /datastore/?output=all answers (built in SQL, kept until the next
        # change): one build per change serves both, where the model built in Python and
        # dumped with indent 2 took the datastore's GIL for seconds at 100,000 images.
        mirror = JsonMirror(
            root, lambda: index.export_monailabel_json(settings.dataset_name, settings.dataset_description)
        )
        legacy = lambda: read_monailabel_json(root)  # noqa: E731
    datastore = Datastore(
        blobs,
        index,
        backend=settings.backend,
        location=location,
        max_upload_bytes=settings.max_upload_bytes,
        lease_ttl_seconds=settings.lease_ttl_seconds,
        session_max_expiry_seconds=settings.session_expiry,
        sessions_per_client=settings.sessions_per_client,
        sessions_max=settings.sessions_max,
        session_purge_seconds=settings.session_purge_seconds,
        export_idle_seconds=settings.export_idle_seconds,
        mirror=mirror,
        legacy_model=legacy,
        display_name=settings.dataset_name,
        description=settings.dataset_description,
        clock=clock,
    )
    datastore.open()
    return datastore


def build_pacs_datastore(settings: DatastoreSettings) -> Datastore:
    """Images from a DICOMweb server; converted series and labels cached under state_dir/studies."""
    if not settings.dicomweb_url.startswith(("http://", "https://")):
        raise ValueError("backend dicomweb needs --dicomweb-url http(s)://HOST:PORT/dicom-web")
    pacs = DicomwebPacs(
        settings.dicomweb_url,
        username=settings.dicomweb_username,
        password=settings.dicomweb_password.get_secret_value(),
        token=settings.dicomweb_token.get_secret_value(),
        search_filter=parse_search_filter(settings.dicomweb_search_filter),
        timeout_seconds=settings.dicomweb_timeout_seconds,
    )
    cache = (settings.state_dir / "studies").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    index = SqlIndex(settings.index or f"sqlite:///{settings.state_dir.resolve() / 'index.db'}")
    datastore = PacsDatastore(
        pacs,
        LocalBlobStore(cache),
        index,
        sync_seconds=settings.dicomweb_sync_seconds,
        backend="dicomweb",
        location=pacs.url,
        max_upload_bytes=settings.max_upload_bytes,
        lease_ttl_seconds=settings.lease_ttl_seconds,
        session_max_expiry_seconds=settings.session_expiry,
        sessions_per_client=settings.sessions_per_client,
        sessions_max=settings.sessions_max,
        session_purge_seconds=settings.session_purge_seconds,
        display_name=settings.dataset_name,
        description=settings.dataset_description,
    )
    datastore.open()
    return datastore
