"""Slicer's download grant across gateway replicas: two real gateways over one real datastore
(and the real active learning service), auth on with built-in users' tokens and service
identities. The next sample asked on gateway A grants one tokenless download that gateway B
honours (the grant is a datastore record), once, for that address and image, until it expires."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc

from gateway.auth import GRANT_KIND, grant_record_id
from services.activelearning.service import start_service
from services.activelearning.settings import ActiveLearningSettings
from services.common.auth import ANNOTATOR, USER, Identity, issue_access_token, new_signing_key
from services.common.protos import dict_to_struct, struct_to_dict
from tests.contract.helpers import nifti_bytes
from tests.fixtures.gateway import GatewayStack
from tests.ports import free_port

pytestmark = pytest.mark.timeout(180)

KEY = new_signing_key()
GATEWAY_TOKEN = "gateway-service-token-" + "g" * 20
AL_TOKEN = "activelearning-service-token-" + "a" * 20
AUTH = {"auth_signing_key": KEY, "auth_services": [f"gateway={GATEWAY_TOKEN}", f"activelearning={AL_TOKEN}"]}
GATEWAY_AUTH = {**AUTH, "auth_service_token": GATEWAY_TOKEN, "auth_download_ttl_seconds": 60}
IMAGES = ["case_0", "case_1", "case_2", "case_3"]
INGRESS_NETWORK = "10.0.0.0/8"


def bearer(name: str, role: str) -> dict[str, str]:
    return {"authorization": f"Bearer {issue_access_token(Identity(name, frozenset({role})), KEY, 300)}"}


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayStack, GatewayStack]]:
    root = tmp_path_factory.mktemp("grants")
    holder: dict[str, Any] = {}

    async def start_activelearning(datastore_address: str) -> tuple[str, Any]:
        settings = ActiveLearningSettings(
            port=0, metrics_port=-1, datastore=datastore_address, device="cpu", work_dir=root / "al",
            torch_threads=1, auth_service_token=AL_TOKEN, **AUTH,
        )  # fmt: skip
        server, _service = await start_service(settings)
        holder["a"].gateway_overrides["activelearning_address"] = server.address
        return f"127.0.0.1:{free_port()}", server

    a = GatewayStack(
        root / "a", gateway_overrides=dict(GATEWAY_AUTH), datastore_overrides=AUTH, start_inference=start_activelearning
    )
    holder["a"] = a
    a.start()
    # Replica B: the same datastore and active learning service (its own datastore goes unused),
    # behind an Ingress whose pods are in 10.0.0.0/8 (it believes their X-Forwarded-For).
    b = GatewayStack(
        root / "b",
        gateway_overrides={
            **GATEWAY_AUTH,
            "forwarded_allow_ips": ["127.0.0.1", INGRESS_NETWORK],
            "datastore_address": a.datastore_address,
            "activelearning_address": a.gateway_overrides["activelearning_address"],
        },
        datastore_overrides=AUTH,
    ).start()
    with httpx.Client(base_url=a.url, timeout=60) as http:
        for n, image_id in enumerate(IMAGES):
            put = http.put(
                "/datastore/image",
                params={"image": image_id},
                files={"file": (f"{image_id}.nii.gz", nifti_bytes((8, 8, 8), seed=n))},
                headers=bearer("annie", ANNOTATOR),
            )
            assert put.status_code == 200, put.text
    yield a, b
    b.stop()
    a.stop()


def next_sample(gateway: GatewayStack) -> dict[str, Any]:
    response = httpx.post(
        f"{gateway.url}/activelearning/first", json={"client_id": "slicer"}, headers=bearer("uma", USER), timeout=60
    )
    assert response.status_code == 200 and response.json().get("id"), response.text
    return response.json()


def download(gateway: GatewayStack, image_id: str, forwarded_for: str | None = None) -> httpx.Response:
    """Stock Slicer's download: a bare GET, no header, no token (from another client address,
    as a trusted loopback proxy names it, when forwarded_for is given)."""
    headers = {"x-forwarded-for": forwarded_for} if forwarded_for else {}
    return httpx.get(f"{gateway.url}/datastore/image", params={"image": image_id}, headers=headers, timeout=60)


def grant_record(gateway: GatewayStack, image_id: str) -> ds_pb.GetRecordResponse | None:
    with grpc.insecure_channel(gateway.datastore_address) as channel:
        try:
            return ds_grpc.DatastoreServiceStub(channel).GetRecord(
                ds_pb.GetRecordRequest(name=f"records/{GRANT_KIND}/{grant_record_id(image_id, '127.0.0.1')}"),
                metadata=(("authorization", f"Bearer {GATEWAY_TOKEN}"),),
                timeout=10,
            )
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
            return None


def test_a_grant_of_replica_a_is_honoured_once_by_replica_b(gateways: tuple[GatewayStack, GatewayStack]) -> None:
    a, b = gateways
    sample = next_sample(a)
    image_id = sample["id"]
    record = grant_record(a, image_id)
    # Another client address gets nothing, and does not use the grant up.
    assert download(b, image_id, forwarded_for="10.9.9.9").status_code == 401
    got = download(b, image_id)
    assert got.status_code == 200 and got.content == nifti_bytes((8, 8, 8), seed=IMAGES.index(image_id))
    assert record is not None and struct_to_dict(record.record.data)["user"] == "uma"  # audited as uma
    assert grant_record(a, image_id) is None  # used: gone for every replica
    assert download(b, image_id).status_code == 401
    assert download(a, image_id).status_code == 401
    # Without a grant nothing else opened: another image, tokenless, on either replica.
    other = next(i for i in IMAGES if i != image_id)
    assert download(a, other).status_code == 401 and download(b, other).status_code == 401


def test_an_expired_grant_is_refused_everywhere(gateways: tuple[GatewayStack, GatewayStack]) -> None:
    a, b = gateways
    image_id = next_sample(b)["id"]
    record = grant_record(a, image_id)  # B's own datastore is unused: A's is the shared one
    assert record is not None
    # The grant as it is some seconds past its TTL (the TTL's floor of 10 s is not waited for).
    data = {**struct_to_dict(record.record.data), "expires": time.time() - 1}
    with grpc.insecure_channel(a.datastore_address) as channel:
        ds_grpc.DatastoreServiceStub(channel).PutRecord(
            ds_pb.PutRecordRequest(name=record.record.name, data=dict_to_struct(data)),
            metadata=(("authorization", f"Bearer {GATEWAY_TOKEN}"),),
            timeout=10,
        )
    assert download(a, image_id).status_code == 401
    assert grant_record(a, image_id) is None  # an expired grant is removed when tried
    assert download(b, image_id).status_code == 401


def test_only_one_of_two_replicas_taking_a_grant_at_once_wins(gateways: tuple[GatewayStack, GatewayStack]) -> None:
    import concurrent.futures

    a, b = gateways
    image_id = next_sample(a)["id"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = sorted(r.status_code for r in pool.map(lambda g: download(g, image_id), [a, b, a, b]))
    assert codes == [200, 401, 401, 401]


def test_behind_a_trusted_ingress_the_grant_is_for_the_client_not_the_ingress(
    gateways: tuple[GatewayStack, GatewayStack],
) -> None:
    a, b = gateways
    # Slicer at 203.0.113.7 through Ingress pod 10.1.2.3 (which appends the address it saw).
    asked = httpx.post(
        f"{b.url}/activelearning/first",
        json={"client_id": "slicer-remote"},
        headers={**bearer("uma", USER), "x-forwarded-for": "203.0.113.7, 10.1.2.3"},
        timeout=60,
    )
    assert asked.status_code == 200 and asked.json().get("id"), asked.text
    image_id = asked.json()["id"]
    # Another client behind the same Ingress does not get it; nor does a hop B does not trust
    # (a client that wrote the Slicer's address into its own header), nor replica A, which
    # believes only loopback and so sees the Ingress pod's address.
    assert download(b, image_id, forwarded_for="198.51.100.9, 10.1.2.3").status_code == 401
    assert download(b, image_id, forwarded_for="203.0.113.7, 198.51.100.9").status_code == 401
    assert download(a, image_id, forwarded_for="203.0.113.7, 10.1.2.3").status_code == 401
    # The Slicer itself does, through another Ingress pod, once.
    assert download(b, image_id, forwarded_for="203.0.113.7, 10.7.7.7").status_code == 200
    assert download(b, image_id, forwarded_for="203.0.113.7, 10.7.7.7").status_code == 401


async def test_a_grant_issued_again_while_one_replica_takes_it_is_not_deleted(
    gateways: tuple[GatewayStack, GatewayStack],
) -> None:
    """Replica A marks the grant used (a conditional write at its revision); before A deletes
    it, replica B answers next sample with the same image to the same address and writes the
    grant again. A deletes only the revision it marked used, so B's new grant stays for one use.
    The two replicas are two DownloadGrants on the real shared datastore; the interleaving is
    made exact by letting B write right after A's "used" write answers."""
    from gateway.auth import DownloadGrants

    a, _b = gateways
    image_id, address = "case_3", "192.0.2.55"
    metadata = (("authorization", f"Bearer {GATEWAY_TOKEN}"),)
    async with grpc.aio.insecure_channel(a.datastore_address) as channel:
        real = ds_grpc.DatastoreServiceStub(channel)
        replica_b = DownloadGrants(real, timeout=10)

        class ReissuedAfterUse:
            """The real datastore; replica B grants again right after A's "used" write."""

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            async def PutRecord(self, request: ds_pb.PutRecordRequest, **kwargs: Any) -> Any:
                answer = await real.PutRecord(request, **kwargs)
                if struct_to_dict(request.data).get("used"):
                    await replica_b.grant(image_id, address, "vera", 60, metadata)
                return answer

        replica_a = DownloadGrants(ReissuedAfterUse(), timeout=10)
        await replica_b.grant(image_id, address, "uma", 60, metadata)
        assert await replica_a.take(image_id, address, metadata) == "uma"
        # B's grant survived A's delete, unused, and is honoured once.
        stored = await real.GetRecord(
            ds_pb.GetRecordRequest(name=f"records/{GRANT_KIND}/{grant_record_id(image_id, address)}"),
            metadata=metadata,
            timeout=10,
        )
        data = struct_to_dict(stored.record.data)
        assert data["user"] == "vera" and not data.get("used")
        assert await replica_b.take(image_id, address, metadata) == "vera"
        assert await replica_b.take(image_id, address, metadata) is None
