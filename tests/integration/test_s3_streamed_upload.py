"""A 512 MiB upload to the datastore process on S3: its parts go to SeaweedFS while the stream
arrives (domain.streaming), memory stays flat, and the object appears whole with its sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import grpc
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2 as pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc

from tests.fixtures.processes import PeakRss
from tests.integration.test_datastore_process import CHUNK, DatastoreProcess, _big_nifti, _upload_requests

pytestmark = pytest.mark.timeout(300)


@pytest.mark.slow
def test_a_large_streamed_s3_upload_keeps_memory_flat(tmp_path: Path, seaweedfs: Any) -> None:
    bucket = seaweedfs.new_bucket()
    process = DatastoreProcess(
        tmp_path / "studies",
        "--backend", "s3", "--s3-endpoint", seaweedfs.endpoint, "--s3-bucket", bucket,
        "--s3-access-key", seaweedfs.access_key, "--s3-secret-key", seaweedfs.secret_key,
        "--state-dir", str(tmp_path / "state"),
    )  # fmt: skip
    try:
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.DatastoreServiceStub(channel)
            stub.GetStatus(pb.GetStatusRequest())  # warm up imports and pools
            sampler = PeakRss(process.proc.pid)
            head, data_bytes = _big_nifti(512 * CHUNK)
            digest = hashlib.sha256()
            image = stub.UploadImage(_upload_requests(head, data_bytes, digest)).image
            growth = sampler.stop()
            assert image.size_bytes == len(head) + data_bytes and image.sha256 == digest.hexdigest()
        print(f"datastore RSS on S3: peak growth {growth / 2**20:.0f} MiB for a 512 MiB upload")
        assert growth < 96 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB while streaming 512 MiB to S3"
    finally:
        assert process.stop() == 0
    client = seaweedfs.client()
    stat = client.stat_object(bucket, "images/big.nii")
    assert stat.size == len(head) + data_bytes
    assert stat.etag.endswith(f"-{-(-stat.size // (16 * CHUNK))}"), "sent as 16 MiB parts"
    assert {k.lower(): v for k, v in stat.metadata.items()}["x-amz-meta-sha256"] == digest.hexdigest()
    assert list(client._list_multipart_uploads(bucket).uploads) == []
