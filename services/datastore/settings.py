"""Settings of the datastore service (env LABELGRID_*, or flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pydantic

from services.common.settings import ServiceSettings


class DatastoreSettings(ServiceSettings):
    port: int = 50051
    backend: Literal["local", "s3", "dicomweb"] = "local"
    # local: the studies folder (MONAI Label's --studies); also holds the SQLite index.
    root: Path = Path("var/studies")
    # SQLAlchemy URL of the index; empty means SQLite under <root>/.labelgrid/ (local) or
    # under state_dir (s3). Give a PostgreSQL URL to run several datastore replicas.
    index: str = ""
    # s3: where the blobs live.
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = "minioadmin"
    s3_secret_key: str = "minioadmin"
    s3_bucket: str = "labelgrid"
    s3_prefix: str = ""
    s3_secure: bool = False
    s3_region: str = ""
    s3_create_bucket: bool = True
    # The address clients outside the cluster reach the same S3 at (HOST:PORT or
    # http(s)://HOST:PORT), empty if they cannot: with it, GetDownloadUrl(for_client) signs
    # downloads there, for the gateway's download redirect (LABELGRID_DOWNLOAD_REDIRECT).
    s3_public_endpoint: str = ""
    # dicomweb: the PACS's DICOMweb root (MONAI Label's --studies http://HOST:PORT/dicom-web);
    # credentials basic or bearer, from env (LABELGRID_DICOMWEB_*), never logged. Series are
    # converted and cached under state_dir/studies (the blob store), indexed in `index`.
    dicomweb_url: str = ""
    dicomweb_username: str = ""
    dicomweb_password: pydantic.SecretStr = pydantic.SecretStr("")
    dicomweb_token: pydantic.SecretStr = pydantic.SecretStr("")
    # MONAI Label's MONAI_LABEL_DICOMWEB_SEARCH_FILTER: QIDO attributes selecting the images (JSON).
    dicomweb_search_filter: str = '{"Modality": "CT"}'
    # Seconds between two listings of the PACS (0: only at start and on demand).
    dicomweb_sync_seconds: Annotated[float, pydantic.Field(ge=0)] = 60.0
    dicomweb_timeout_seconds: Annotated[float, pydantic.Field(gt=0)] = 30.0
    # s3 and dicomweb: local scratch space for uploads being verified, and the default SQLite index.
    state_dir: Path = Path("var/datastore")
    max_upload_bytes: int = 8 * 1024**3
    lease_ttl_seconds: float = 1800.0
    # MONAI Label's sessions: longest lifetime (a session asking for more, or 0, gets this),
    # live sessions one client may hold (the gateway names the owner: the user with auth on,
    # else the client_id) and in all; seconds between two purges of expired sessions' files.
    session_expiry: Annotated[int, pydantic.Field(gt=0)] = 3600
    sessions_per_client: Annotated[int, pydantic.Field(gt=0)] = 20
    sessions_max: Annotated[int, pydantic.Field(gt=0)] = 500
    session_purge_seconds: Annotated[float, pydantic.Field(gt=0)] = 60.0
    # One dataset export at a time; one neither built nor read for this long (a stalled
    # download) gives its slot to the next export.
    export_idle_seconds: Annotated[float, pydantic.Field(gt=0)] = 300.0
    dataset_name: str = "new-dataset"
    dataset_description: str = "New Dataset"
