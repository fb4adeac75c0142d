"""A real datastore gRPC server per test, on every blob backend x index backend.

S3 is a real SeaweedFS, PostgreSQL a real embedded server (tests/fixtures); the server
runs in-process on an ephemeral loopback port and is reached over a real channel.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc

from services.datastore.settings import DatastoreSettings
from tests.fixtures.datastore import MAX_UPLOAD, RunningDatastore, start_datastore

BACKENDS = ["local-sqlite", "s3-sqlite", "local-postgres", "s3-postgres"]


@pytest.fixture(params=BACKENDS)
def datastore_settings(request: pytest.FixtureRequest, tmp_path: Path) -> DatastoreSettings:
    blob_backend, index_backend = request.param.split("-")
    values: dict = {
        "port": 0,
        "metrics_port": -1,
        "backend": blob_backend,
        "root": tmp_path / "studies",
        "state_dir": tmp_path / "state",
        "max_upload_bytes": MAX_UPLOAD,
        "lease_ttl_seconds": 60.0,
    }
    if blob_backend == "s3":
        values.update(request.getfixturevalue("seaweedfs").datastore_settings())
    if index_backend == "postgres":
        values["index"] = request.getfixturevalue("postgres_url")
    return DatastoreSettings(**values)


@pytest.fixture
async def datastore_server(datastore_settings: DatastoreSettings):
    running = await start_datastore(datastore_settings)
    yield running
    await running.service.stop(0)


@pytest.fixture
async def stub(datastore_server: RunningDatastore):
    async with grpc.aio.insecure_channel(datastore_server.address) as channel:
        yield pb_grpc.DatastoreServiceStub(channel)
