"""Bombs against the services as users run them (their own processes): refused, and the peak
resident memory of each server process (VmHWM in /proc/<pid>/status) barely moves.

Before the shared check, pynrrd inflated a whole NRRD gzip stream in the inference service
(hundreds of MiB here from a ~0.5 MiB upload) and pydicom read a DICOM's huge private element
into the datastore's memory."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from labelgrid.inference.v1 import inference_service_pb2 as inf_pb
from labelgrid.inference.v1 import inference_service_pb2_grpc as inf_grpc

from tests.fixtures.hostile import read_all, upload_messages
from tests.fixtures.processes import ServiceProcess, ServiceStartError, datastore_and_inference, peak_rss
from tests.security import hostile as files

pytestmark = pytest.mark.timeout(240)

MIB = 1024 * 1024
BOMB = 256 * MIB  # what each bomb expands to
ALLOWED_GROWTH = 96 * MIB


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    try:
        with datastore_and_inference(tmp_path_factory.mktemp("rss"), "--no-warm-up") as started:
            yield started
    except ServiceStartError as error:
        pytest.fail(str(error))


@pytest.mark.parametrize("case", ["nrrd-gzip-bomb", "nifti-gzip-bomb", "nrrd-bzip2-bomb"])
def test_inference_memory_stays_bounded(services: tuple[ServiceProcess, ServiceProcess], case: str) -> None:
    _, inference = services
    builder = {
        "nrrd-gzip-bomb": files.nrrd_gzip_bomb,
        "nifti-gzip-bomb": files.nifti_gzip_bomb,
        "nrrd-bzip2-bomb": files.nrrd_bzip2_bomb,
    }
    name, data = builder[case](BOMB)
    before = peak_rss(inference.proc.pid)
    with grpc.insecure_channel(inference.address) as channel:
        stub = inf_grpc.InferenceServiceStub(channel)
        header = inf_pb.InferUploadHeader(model="models/segmentation", image_file_name=name, image_size_bytes=len(data))
        with pytest.raises(grpc.RpcError) as caught:
            read_all(stub.InferUpload(upload_messages("inference", header, data), timeout=120))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "decompression bomb" in (caught.value.details() or "")
        assert stub.ServerLive(inf_pb.ServerLiveRequest(), timeout=10).live
    growth = peak_rss(inference.proc.pid) - before
    assert growth < ALLOWED_GROWTH, f"inference peak RSS grew by {growth / MIB:.0f} MiB"


@pytest.mark.parametrize("case", ["dicom-zip-huge-element", "nifti-gzip-bomb", "nrrd-gzip-bomb"])
def test_datastore_memory_stays_bounded(services: tuple[ServiceProcess, ServiceProcess], case: str) -> None:
    datastore, _ = services
    builder = {
        "dicom-zip-huge-element": files.dicom_zip_huge_element,
        "nifti-gzip-bomb": files.nifti_gzip_bomb,
        "nrrd-gzip-bomb": files.nrrd_gzip_bomb,
    }
    name, data = builder[case](BOMB)
    before = peak_rss(datastore.proc.pid)
    with grpc.insecure_channel(datastore.address) as channel:
        stub = ds_grpc.DatastoreServiceStub(channel)
        header = ds_pb.UploadImageHeader(image_id="bomb", file_name=name, size_bytes=len(data))
        with pytest.raises(grpc.RpcError) as caught:
            stub.UploadImage(upload_messages("datastore", header, data), timeout=120)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [i.image_id for i in stub.ListImages(ds_pb.ListImagesRequest(), timeout=10).images] == ["sample_00"]
    growth = peak_rss(datastore.proc.pid) - before
    assert growth < ALLOWED_GROWTH, f"datastore peak RSS grew by {growth / MIB:.0f} MiB"
