"""An infer on a stored image renews the annotator's lease on it in the inference service, so
a gRPC or SDK client gets it as REST clients do (issue 17 item 6).

A real datastore and inference service, in-process on loopback ports. The infer is held in
the device's queue (the test holds the one CPU slot) while the test watches the lease.
"""

from __future__ import annotations

import asyncio
import gzip
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import nibabel as nib
import numpy as np
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2 as ds
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from labelgrid.inference.v1 import inference_service_pb2 as pb
from labelgrid.inference.v1 import inference_service_pb2_grpc as pb_grpc
from labelgrid.inference.v1 import resources_pb2 as res

from services.datastore.settings import DatastoreSettings
from services.infer.api.servicer import create_service
from services.infer.app import build_inference
from services.infer.domain.inference import Inference
from services.infer.settings import InferSettings
from tests.contract.helpers import struct, upload_image
from tests.fixtures.datastore import start_datastore
from tests.fixtures.gateway import GatewayStack
from tests.fixtures.polling import eventually
from tests.ports import free_port

SHORT_TTL = 60  # the lease next-sample gave; a renewal gives the datastore's default (1800 s)


def small_image() -> bytes:
    data = np.zeros((16, 16, 16), np.float32)
    data[4:12, 4:12, 4:12] = 1.0
    return gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes(), compresslevel=1, mtime=0)


@pytest.fixture
async def services() -> AsyncIterator[tuple[ds_grpc.DatastoreServiceStub, pb_grpc.InferenceServiceStub, Inference]]:
    with tempfile.TemporaryDirectory(prefix="labelgrid-lease-") as tmp:
        root = Path(tmp)
        datastore = await start_datastore(
            DatastoreSettings(
                port=free_port(), metrics_port=-1, backend="local", root=root / "studies", state_dir=root / "state"
            )
        )
        settings = InferSettings(
            port=free_port(), metrics_port=-1, datastore=datastore.address, device="cpu", work_dir=root / "infer"
        )
        inference, client = await asyncio.to_thread(build_inference, settings)
        service = create_service(settings, inference, client)
        await service.start()
        async with (
            grpc.aio.insecure_channel(datastore.address) as ds_channel,
            grpc.aio.insecure_channel(service.address) as channel,
        ):
            try:
                yield ds_grpc.DatastoreServiceStub(ds_channel), pb_grpc.InferenceServiceStub(channel), inference
            finally:
                await service.stop(0)
                await datastore.service.stop(0)


async def _lease_expiry(ds_stub: ds_grpc.DatastoreServiceStub, client_id: str) -> int:
    leases = (await ds_stub.ListImageLeases(ds.ListImageLeasesRequest(client_id=client_id))).leases
    assert len(leases) == 1
    return int(leases[0].expire_time.seconds)


async def _upload_requests(header: pb.InferUploadHeader) -> AsyncIterator[pb.InferUploadRequest]:
    yield pb.InferUploadRequest(header=header)


@pytest.mark.parametrize("rpc", ["Infer", "InferUpload"])
async def test_infer_over_grpc_renews_the_clients_lease(services: Any, rpc: str) -> None:
    ds_stub, stub, inference = services
    await upload_image(ds_stub, small_image(), "lease.nii.gz", image_id="lease_1")
    acquired = await ds_stub.AcquireImageLease(
        ds.AcquireImageLeaseRequest(client_id="annotator-1", strategy="random", ttl_seconds=SHORT_TTL)
    )
    assert acquired.lease.image_id == "lease_1"
    first_expiry = acquired.lease.expire_time.seconds
    assert first_expiry <= acquired.lease.acquire_time.seconds + SHORT_TTL

    # MONAI Label's client sends its client_id in the params of every infer.
    params = res.InferParams(params=struct({"client_id": "annotator-1"}))
    queue = inference.scheduler.pick("")
    async with queue.slot("segmentation"):  # the infer waits for the device: a slow one
        if rpc == "Infer":
            call = stub.Infer(pb.InferRequest(model="models/segmentation", image="images/lease_1", params=params))
        else:
            header = pb.InferUploadHeader(model="models/segmentation", image="images/lease_1", params=params)
            call = stub.InferUpload(_upload_requests(header))
        reading = asyncio.create_task(_read_all(call))
        await eventually(lambda: queue.total_waiting == 1, "the infer to wait for the device", timeout=30)
        expiry = await _wait_for_renewal(ds_stub, first_expiry)
        assert not reading.done(), "the lease must be renewed while the infer runs"
    messages = await reading
    assert messages[0].WhichOneof("payload") == "header" and messages[0].header.HasField("label")
    assert expiry > first_expiry + 600  # the datastore's default TTL, as the gateway renewed


async def test_infer_without_a_lease_or_by_another_client_leaves_leases_alone(services: Any) -> None:
    ds_stub, stub, _inference = services
    await upload_image(ds_stub, small_image(), "lease.nii.gz", image_id="lease_2")
    acquired = await ds_stub.AcquireImageLease(
        ds.AcquireImageLeaseRequest(client_id="annotator-1", strategy="random", ttl_seconds=SHORT_TTL)
    )
    # Another annotator's infer (it holds no lease: the renewal fails quietly) still answers.
    params = res.InferParams(params=struct({"client_id": "annotator-2"}))
    messages = await _read_all(
        stub.Infer(pb.InferRequest(model="models/segmentation", image="images/lease_2", params=params))
    )
    assert messages[0].header.HasField("label")
    assert await _lease_expiry(ds_stub, "annotator-1") == acquired.lease.expire_time.seconds


def test_infer_through_rest_renews_the_lease_as_before(inference_stack: GatewayStack) -> None:
    """MONAI Label's client: POST /infer/{model}?image=... with its client_id in params."""
    with httpx.Client(base_url=inference_stack.url, timeout=60) as http:
        put = http.put("/datastore/", params={"image": "rest_1"}, files={"file": ("rest_1.nii.gz", small_image())})
        assert put.status_code == 200, put.text
        with grpc.insecure_channel(inference_stack.datastore_address) as channel:
            ds_stub = ds_grpc.DatastoreServiceStub(channel)
            acquired = ds_stub.AcquireImageLease(
                ds.AcquireImageLeaseRequest(client_id="slicer-1", strategy="random", ttl_seconds=SHORT_TTL)
            )
            assert acquired.lease.image_id == "rest_1"
            response = http.post(
                "/infer/segmentation", params={"image": "rest_1"}, data={"params": '{"client_id": "slicer-1"}'}
            )
            assert response.status_code == 200, response.text
            # The service renews before it answers, as the gateway did.
            leases = ds_stub.ListImageLeases(ds.ListImageLeasesRequest(client_id="slicer-1")).leases
            assert len(leases) == 1
            assert leases[0].expire_time.seconds > acquired.lease.expire_time.seconds + 600


async def _read_all(call: Any) -> list[Any]:
    return [message async for message in call]


async def _wait_for_renewal(ds_stub: ds_grpc.DatastoreServiceStub, first_expiry: int) -> int:
    expiry = first_expiry

    async def renewed() -> bool:
        nonlocal expiry
        expiry = await _lease_expiry(ds_stub, "annotator-1")
        return expiry > first_expiry

    await eventually(renewed, "the lease to be renewed", timeout=30, interval=0.05)
    return expiry
