"""The volume caps are settings of every service (env, flag or constructor), applied when the
service starts: a datastore started with a small max_volume_voxels refuses a bigger upload."""

from __future__ import annotations

from pathlib import Path

import grpc
import pydantic
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc

from services.common import formats
from services.common.settings import ServiceSettings, parse_settings
from services.datastore.settings import DatastoreSettings
from tests.fixtures.datastore import start_datastore
from tests.fixtures.hostile import nifti, upload_messages

pytestmark = pytest.mark.timeout(120)


def test_volume_caps_come_from_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = parse_settings(ServiceSettings, ["--max-volume-voxels", "500", "--max-volume-bytes", "4096"])
    assert flags.volume_limits == formats.VolumeLimits(max_voxels=500, max_bytes=4096)
    monkeypatch.setenv("LABELGRID_MAX_VOLUME_BYTES", "1234")
    assert ServiceSettings().volume_limits.max_bytes == 1234
    assert ServiceSettings().max_volume_voxels == formats.VolumeLimits.max_voxels
    for bad in (0, -5):
        with pytest.raises(pydantic.ValidationError, match="max_volume_voxels"):
            ServiceSettings(max_volume_voxels=bad)


async def test_a_service_applies_its_volume_caps(tmp_path: Path) -> None:
    settings = DatastoreSettings(
        port=0, metrics_port=-1, backend="local", root=tmp_path / "studies", state_dir=tmp_path / "state",
        max_volume_voxels=500,
    )  # fmt: skip
    datastore = await start_datastore(settings)
    try:
        assert formats.current_limits().max_voxels == 500
        data = nifti((12, 10, 8))  # 960 voxels
        header = ds_pb.UploadImageHeader(image_id="over-cap", file_name="a.nii.gz", size_bytes=len(data))
        async with grpc.aio.insecure_channel(datastore.address) as channel:
            stub = ds_grpc.DatastoreServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.UploadImage(upload_messages("datastore", header, data), timeout=30)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "voxels" in (caught.value.details() or ""), caught.value.details()
            small = nifti((8, 8, 6))  # 384 voxels
            header = ds_pb.UploadImageHeader(image_id="under-cap", file_name="a.nii.gz", size_bytes=len(small))
            assert (
                await stub.UploadImage(upload_messages("datastore", header, small), timeout=30)
            ).image.image_id == "under-cap"
    finally:
        await datastore.service.stop(0)
        formats.configure_limits(formats.DEFAULT_LIMITS)
