"""The datastore as users run it: its own process, started by `python -m services.datastore`."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import nibabel as nib
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc

from services.datastore.sample_studies import write_sample_studies
from tests.fixtures.processes import PeakRss, ServiceProcess, ServiceStartError

pytestmark = pytest.mark.timeout(300)

CHUNK = 1024 * 1024


def DatastoreProcess(root: Path, *extra: str) -> ServiceProcess:
    try:
        return ServiceProcess("services.datastore", "--root", str(root), "--metrics-port", "0", *extra)
    except ServiceStartError as error:
        pytest.fail(str(error))


@pytest.fixture
def studies(tmp_path: Path) -> Path:
    root = tmp_path / "studies"
    write_sample_studies(root, count=4, labeled=1, size=24)
    return root


def test_sample_studies_open_as_a_monai_label_folder_and_shutdown_is_clean(studies: Path):
    process = DatastoreProcess(studies)
    try:
        with grpc.insecure_channel(process.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(service="labelgrid.datastore.v1.DatastoreService"))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.DatastoreServiceStub(channel)
            status = stub.GetStatus(pb.GetStatusRequest())
            assert (status.total, status.completed) == (4, 1)
            images = stub.ListImages(pb.ListImagesRequest()).images
            assert [i.image_id for i in images] == ["sample_00", "sample_01", "sample_02", "sample_03"]
            assert dict(images[0].info)["name"] == "sample_00.nii.gz"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=5).read().decode()
        assert re.search(r'grpc_server_handled_total\{grpc_code="OK",grpc_method="GetStatus",[^}]*\} 1\.0', metrics)
    finally:
        code = process.stop()
    assert code == 0, "".join(process.output[-30:])
    # MONAI Label's own file now describes the folder, for MONAI Label to open it again.
    assert (studies / "datastore_v2.json").exists()


def test_reindex_command(studies: Path):
    result = subprocess.run(
        [sys.executable, "-m", "services.datastore", "reindex", "--root", str(studies)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "4 images, 1 labels" in result.stdout
    assert "0 files skipped" in result.stdout


def test_reindex_command_names_the_files_it_skips(tmp_path: Path):
    write_sample_studies(tmp_path, count=2, labeled=0, size=16)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume at all")
    result = subprocess.run(
        [sys.executable, "-m", "services.datastore", "reindex", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "2 images" in result.stdout and "1 files skipped" in result.stdout
    assert re.search(r"^  skipped images/broken\.nii\.gz: not a gzip-compressed file", result.stdout, re.MULTILINE), (
        result.stdout
    )


def _big_nifti(total_bytes: int) -> tuple[bytes, int]:
    """A valid uncompressed NIfTI header for a uint8 volume of about total_bytes."""
    side = 512
    depth = total_bytes // (side * side)
    header = nib.Nifti1Header()
    header.set_data_shape((side, side, depth))
    header.set_data_dtype(np.uint8)
    header.set_data_offset(352)
    raw = header.binaryblock + b"\0" * (352 - len(header.binaryblock))
    return raw, side * side * depth


def _upload_requests(head: bytes, data_bytes: int, digest: hashlib._Hash) -> Iterator[pb.UploadImageRequest]:
    yield pb.UploadImageRequest(header=pb.UploadImageHeader(image_id="big", file_name="big.nii"))
    digest.update(head)
    yield pb.UploadImageRequest(chunk=head)
    block = bytes(range(256)) * (CHUNK // 256)
    sent = 0
    while sent < data_bytes:
        piece = block[: min(CHUNK, data_bytes - sent)]
        digest.update(piece)
        sent += len(piece)
        yield pb.UploadImageRequest(chunk=piece)
    yield pb.UploadImageRequest(finish=common_pb2.UploadFinish(sha256=digest.hexdigest()))


@pytest.mark.slow
def test_streaming_a_large_volume_keeps_memory_flat(tmp_path: Path):
    """Storing and reading back 512 MiB must not grow the service's RSS with the payload."""
    process = DatastoreProcess(tmp_path / "studies")
    try:
        with grpc.insecure_channel(
            process.address, options=[("grpc.max_receive_message_length", 8 * CHUNK)]
        ) as channel:
            stub = pb_grpc.DatastoreServiceStub(channel)
            stub.GetStatus(pb.GetStatusRequest())  # warm up imports and pools
            sampler = PeakRss(process.proc.pid)
            head, data_bytes = _big_nifti(512 * CHUNK)
            digest = hashlib.sha256()
            image = stub.UploadImage(_upload_requests(head, data_bytes, digest)).image
            assert image.size_bytes == len(head) + data_bytes and image.sha256 == digest.hexdigest()
            received = hashlib.sha256()
            size = 0
            for message in stub.DownloadImage(pb.DownloadImageRequest(name="images/big")):
                if message.WhichOneof("payload") == "chunk":
                    received.update(message.chunk)
                    size += len(message.chunk)
            assert size == image.size_bytes and received.hexdigest() == image.sha256
            growth = sampler.stop()
        print(
            f"datastore RSS: baseline {sampler.baseline / 2**20:.0f} MiB, peak {sampler.peak / 2**20:.0f} MiB for a 512 MiB volume"
        )
        assert growth < 96 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB while streaming 512 MiB"
    finally:
        assert process.stop() == 0
    assert os.path.getsize(tmp_path / "studies" / "big.nii") == len(head) + data_bytes
