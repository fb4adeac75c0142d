"""Bounded everything: RPCs per server, sessions per client and in total, image info size."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import nibabel as nib
import numpy as np
import pydantic
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb

from services.common.server import GrpcService
from services.common.settings import ServiceSettings
from services.datastore.domain import limits
from tests.fixtures.gateway import GatewayStack
from tests.fixtures.hostile import BASE_IMAGE, Hostile, nifti, read_all
from tests.fixtures.polling import eventually, wait_until

pytestmark = pytest.mark.timeout(120)

SERVICE = "labelgrid.test.Hold"


async def test_a_server_runs_at_most_max_concurrent_rpcs() -> None:
    """Calls over the limit are refused RESOURCE_EXHAUSTED at once (the gateway's 429), not queued;
    once the held calls end, the server answers again."""
    release = asyncio.Event()
    entered = 0

    async def hold(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal entered
        entered += 1
        await release.wait()
        return request

    handler = grpc.method_handlers_generic_handler(SERVICE, {"Hold": grpc.unary_unary_rpc_method_handler(hold)})
    service = GrpcService(
        ServiceSettings(port=0, metrics_port=-1, max_concurrent_rpcs=3),
        [SERVICE],
        lambda server: server.add_generic_rpc_handlers((handler,)),
    )
    await service.start()
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            call = channel.unary_unary(f"/{SERVICE}/Hold")
            held = [asyncio.ensure_future(call(b"held", timeout=30)) for _ in range(3)]
            await eventually(lambda: entered >= 3, "three calls held in the handler", timeout=30, interval=0.01)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(b"over", timeout=30)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            assert await asyncio.gather(*held) == [b"held"] * 3
            assert await call(b"again", timeout=30) == b"again"
    finally:
        await service.stop(0)


@pytest.mark.parametrize("value", [0, -1])
def test_max_concurrent_rpcs_must_be_positive(value: Any) -> None:
    with pytest.raises(pydantic.ValidationError, match="max_concurrent_rpcs"):
        ServiceSettings(max_concurrent_rpcs=value)


# -- sessions ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quota_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    stack = GatewayStack(
        tmp_path_factory.mktemp("quota"), datastore_overrides={"sessions_per_client": 2, "sessions_max": 3}
    ).start()
    yield stack
    stack.stop()


def _stored_sessions(stack: GatewayStack) -> int:
    """Session files the datastore keeps (the local backend: under .labelgrid/sessions/)."""
    folder = stack.root / "studies" / ".labelgrid" / "sessions"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def test_sessions_are_bounded_per_client_and_in_total(quota_stack: GatewayStack) -> None:
    with httpx.Client(base_url=quota_stack.url, timeout=30) as http:

        def create(client: str) -> httpx.Response:
            return http.put("/session/", files={"files": ("a.nii.gz", nifti())}, data={"client_id": client})

        first = [create("alice") for _ in range(2)]
        assert [answer.status_code for answer in first] == [200, 200], [a.text for a in first]
        before = _stored_sessions(quota_stack)
        refused = create("alice")
        assert refused.status_code == 429, refused.text
        assert "this client" in refused.json()["detail"] and "2" in refused.json()["detail"]
        assert _stored_sessions(quota_stack) == before == 2  # nothing stored for the refused one
        assert create("bob").status_code == 200  # another client has its own places
        full = create("carol")
        assert full.status_code == 429 and "the limit is 3" in full.json()["detail"], full.text
        # Ending one of alice's sessions frees a place, for alice and in total.
        assert http.delete(f"/session/{first[0].json()['session_id']}").status_code == 200
        again = create("alice")
        assert again.status_code == 200, again.text
        assert http.get(f"/session/{again.json()['session_id']}").status_code == 200


# -- info sizes and list pages -------------------------------------------------------------------

BIG = json.dumps({"blob": "x" * (70 * 1024)})


def test_a_big_image_info_is_refused_with_a_413(hostile: Hostile) -> None:
    before = hostile.http.get("/datastore/image/info", params={"image": BASE_IMAGE}).json()
    answer = hostile.http.put("/datastore/image/info", params={"image": BASE_IMAGE}, data={"info": BIG})
    assert answer.status_code == 413, answer.text[:300]
    assert "image info" in answer.json()["detail"] and str(limits.MAX_INFO_BYTES) in answer.json()["detail"]
    # Merged infos count whole: two halves that fit alone do not fit together.
    half = json.dumps({"a": "y" * (40 * 1024)})
    assert hostile.http.put(
        "/datastore/image/info", params={"image": "info-halves"}, data={"info": half}
    ).status_code in (404, 400)
    assert (
        hostile.http.put(
            "/datastore/image", params={"image": "info-halves"}, files={"file": ("a.nii.gz", nifti())}
        ).status_code
        == 200
    )
    try:
        assert (
            hostile.http.put("/datastore/image/info", params={"image": "info-halves"}, data={"info": half}).status_code
            == 200
        )
        second = hostile.http.put(
            "/datastore/image/info",
            params={"image": "info-halves"},
            data={"info": json.dumps({"b": "z" * (40 * 1024)})},
        )
        assert second.status_code == 413, second.text[:300]
    finally:
        hostile.http.delete("/datastore/image", params={"id": "info-halves"})
    assert hostile.http.get("/datastore/image/info", params={"image": BASE_IMAGE}).json() == before
    hostile.assert_alive()


@pytest.mark.parametrize("route", ["image", "label"])
def test_a_big_info_with_an_upload_stores_nothing(hostile: Hostile, route: str) -> None:
    before = hostile.stored()
    if route == "image":
        answer = hostile.http.put(
            "/datastore/image",
            params={"image": "big-info"},
            files={"file": ("a.nii.gz", nifti())},
            data={"params": BIG},
        )
    else:
        answer = hostile.http.put(
            "/datastore/label", params={"image": BASE_IMAGE, "tag": "big"}, files={"label": ("l.nii.gz", nifti())},
            data={"params": BIG},
        )  # fmt: skip
    assert answer.status_code == 413, answer.text[:300]
    assert hostile.stored() == before
    hostile.assert_alive()


def test_list_pages_shrink_to_fit_their_infos(hostile: Hostile, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages hold at most PAGE_INFO_BUDGET_BYTES of infos (here made 50 KiB): six images with
    20 KiB infos come two by two, each exactly once, and the gateway's full listing still works."""
    monkeypatch.setattr(limits, "PAGE_INFO_BUDGET_BYTES", 50 * 1024)
    names = [f"wide-{index}" for index in range(6)]
    info = json.dumps({"notes": "n" * (20 * 1024)})
    try:
        for name in names:
            assert (
                hostile.http.put(
                    "/datastore/image",
                    params={"image": name},
                    files={"file": ("a.nii.gz", nifti())},
                    data={"params": info},
                ).status_code
                == 200
            )
        seen: list[str] = []
        sizes = []
        token = ""
        while True:
            page = hostile.datastore.ListImages(ds_pb.ListImagesRequest(page_size=1000, page_token=token), timeout=30)
            sizes.append(len(page.images))
            seen.extend(image.image_id for image in page.images)
            token = page.next_page_token
            if not token:
                break
        assert sorted(name for name in seen if name.startswith("wide-")) == names
        assert len(seen) == len(set(seen))
        assert max(sizes) <= 3, sizes
        everything = hostile.http.get("/datastore/", params={"output": "all"})
        assert everything.status_code == 200 and all(f'"{name}"' in everything.text for name in names)
    finally:
        for name in names:
            hostile.http.delete("/datastore/image", params={"id": name})


# -- dataset export ------------------------------------------------------------------------------


def test_dataset_export_is_single_flight(hostile: Hostile) -> None:
    """While one export's archive exists (built, not yet streamed and removed), another export is
    RESOURCE_EXHAUSTED / ALREADY_RUNNING (a 429); once the first is gone, exports work again."""
    # An archive of ~16 MiB: more than the stream's flow-control windows, so the first export's
    # archive is still there (being streamed) while the client holds back reading.
    noise = np.random.default_rng(1).integers(0, 255, (256, 256, 256), dtype=np.uint8)
    big = gzip.compress(nib.Nifti1Image(noise, np.eye(4)).to_bytes(), compresslevel=1)
    assert (
        hostile.http.put(
            "/datastore/image", params={"image": "export-big"}, files={"file": ("e.nii.gz", big)}
        ).status_code
        == 200
    )
    assert (
        hostile.http.put(
            "/datastore/label", params={"image": "export-big", "tag": "final"}, files={"label": ("l.nii.gz", nifti())}
        ).status_code
        == 200
    )
    try:
        first = hostile.datastore.ExportDataset(ds_pb.ExportDatasetRequest(), timeout=60)
        assert next(first) is not None  # the archive is built and streaming
        with pytest.raises(grpc.RpcError) as caught:
            read_all(hostile.datastore.ExportDataset(ds_pb.ExportDatasetRequest(), timeout=60))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already running" in (caught.value.details() or "")
        busy = hostile.http.get("/datastore/dataset")
        assert busy.status_code == 429, busy.text[:200]
        read_all(first)  # the rest; the servicer removes the archive after the last chunk

        def not_busy() -> httpx.Response | None:
            answer = hostile.http.get("/datastore/dataset")
            return answer if answer.status_code != 429 else None

        answer = wait_until(not_busy, "the first export to be released", timeout=30, interval=0.05)
        assert answer.status_code == 200, answer.text[:200]
        assert answer.content[:2] == b"PK"
    finally:
        hostile.http.delete("/datastore/image", params={"id": "export-big"})
    hostile.assert_alive()
