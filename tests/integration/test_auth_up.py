"""`labelgrid up --auth-users FILE`: the whole stack with auth on, through Envoy.

The supervisor's own ready checks authenticate (the stack comes up), the services reach the
datastore as themselves (next sample, inference), the official client logs in and works, and
nothing answers without a token.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from monailabel.client import MONAILabelClient

from gateway.auth import AUTHENTICATED, PUBLIC, required_role
from services.common.auth import ADMIN, ROLES, USER, Identity, UsersFile, issue_access_token, new_signing_key
from tests.fixtures.labelgrid_up import UP, Stack, port_flags, stop_stack
from tests.ports import free_ports

pytestmark = pytest.mark.timeout(300)
PORTS: dict[str, int] = {}
"""The stack's ports by `labelgrid up` flag."""
KEY = new_signing_key()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("auth-up")
    users = UsersFile()
    users.add("alice", "alice-pw", [ADMIN])
    users.add("uma", "uma-pw", [USER])
    users.save(root / "users.json")
    flags = port_flags()
    ports = dict(zip(flags, free_ports(len(flags)), strict=True))
    PORTS.update(ports)
    argv = [
        sys.executable, "-m", "gateway.cli", "up", "--studies", str(root / "studies"), "--work-dir", str(root / "var"),
        "--device", "cpu", "--train-device", "cpu", "--scoring-device", "cpu", "--sample-studies",
        "--auth-users", str(root / "users.json"),
    ]  # fmt: skip
    for flag, port in ports.items():
        argv += [flag, str(port)]
    # A known signing key, so the tests can make tokens of exactly one role (route enumeration).
    env = {**os.environ, "LABELGRID_AUTH_SIGNING_KEY": KEY}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    running = Stack(proc, f"http://127.0.0.1:{ports['--port']}", ports["--port"], root / "studies")

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            running.output.append(line)

    threading.Thread(target=drain, daemon=True).start()
    try:
        running.wait_for(re.escape(UP), timeout=200)
        yield running
    finally:
        stop_stack(running)


def client(stack: Stack, tmp_path: Path, username: str) -> MONAILabelClient:
    mc = MONAILabelClient(stack.url, tmpdir=str(tmp_path), client_id="tester")
    assert mc.auth_enabled() is True
    mc.update_auth(mc.auth_token(username, f"{username}-pw"))
    assert mc.auth_valid_token() is True
    return mc


def test_the_stack_comes_up_and_refuses_calls_without_a_token(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/auth/").json()["enabled"] is True
    assert httpx.get(f"{stack.url}/info/").status_code == 401
    with grpc.insecure_channel(f"127.0.0.1:{stack.port}") as channel, pytest.raises(grpc.RpcError) as caught:
        ds_grpc.DatastoreServiceStub(channel).GetStatus(ds_pb.GetStatusRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_user_works_through_services_that_act_as_themselves(stack: Stack, tmp_path: Path) -> None:
    uma = client(stack, tmp_path, "uma")
    assert "segmentation" in uma.info()["models"]
    sample = uma.next_sample("random", {})  # active learning reads and marks the datastore as itself
    assert sample["id"]
    # Its link downloads without a header (signed for this image and user), and nothing else does.
    download = httpx.get(sample["path"], timeout=30)
    assert download.status_code == 200 and download.content == (stack.studies / sample["name"]).read_bytes()
    other = "sample_00" if sample["id"] != "sample_00" else "sample_01"
    assert httpx.get(f"{stack.url}/datastore/image", params={"image": other}, timeout=30).status_code == 401
    label, result = uma.infer("segmentation", sample["id"], {})  # inference downloads as itself
    assert Path(label).stat().st_size > 0 and result["label_names"]
    image = tmp_path / "mine.nii.gz"
    shutil.copy(stack.studies / "sample_05.nii.gz", image)
    with pytest.raises(Exception, match="Status: 403"):
        uma.upload_image(str(image), "by_uma")  # an annotator's right

    alice = client(stack, tmp_path, "alice")
    assert alice.upload_image(str(image), "by_alice") == {"image": "by_alice"}
    alice.save_label("by_alice", label)
    assert alice.datastore()["objects"]["by_alice"]["labels"]["final"]["info"]["user"] == "alice"


def test_gateway_token_of_a_user_reaches_grpc_through_envoy(stack: Stack, tmp_path: Path) -> None:
    token = client(stack, tmp_path, "uma")._headers["Authorization"].split(" ", 1)[1]
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(f"127.0.0.1:{stack.port}") as channel:
        stub = ds_grpc.DatastoreServiceStub(channel)
        assert stub.GetStatus(ds_pb.GetStatusRequest(), metadata=metadata, timeout=10).total >= 6
        with pytest.raises(grpc.RpcError) as caught:
            stub.Reindex(ds_pb.ReindexRequest(), metadata=metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_stock_slicers_request_sequence(stack: Stack, tmp_path: Path) -> None:
    """What MONAI Label 0.8.5's Slicer plugin does on "Next Sample" (plugins/slicer/MONAILabel/
    MONAILabel.py onNextSampleButton and MONAILabelLogic._client), request by request: a fresh
    client per action (GET /auth/, the token checked at /auth/token/valid, a login when it has
    none), next_sample, then, since `path` is no file on this machine, SampleData's download:
    `urllib.request.urlretrieve` of `{server}/datastore/image?image=<quote_plus(id)>`, which sends
    no header and no token. Then the datastore listing (for an `original` label) and the label."""
    import hashlib
    import os
    import urllib.error
    import urllib.request
    from urllib.parse import quote_plus

    token: str | None = None

    def slicer_client() -> MONAILabelClient:  # MONAILabelLogic._client
        nonlocal token
        mc = MONAILabelClient(stack.url, str(tmp_path), "user-xyz")
        assert mc.auth_enabled()
        if token:
            mc.update_auth(token)
        if not token or not mc.auth_valid_token():
            token = mc.auth_token("uma", "uma-pw")
            mc.update_auth(token)
        return mc

    assert "segmentation" in slicer_client().info()["models"]
    sample = slicer_client().next_sample("random", {})
    image_id = sample["id"]
    assert image_id and not os.path.exists(sample["path"])  # so Slicer downloads it
    download_uri = f"{stack.url}/datastore/image?image={quote_plus(image_id)}"
    target = tmp_path / sample["name"]
    urllib.request.urlretrieve(download_uri, target)  # SampleDataLogic.downloadFile
    algo, digest = sample["checksum"].split(":")
    assert algo == "SHA256" and hashlib.sha256(target.read_bytes()).hexdigest() == digest
    assert target.read_bytes() == (stack.studies / sample["name"]).read_bytes()
    # The grant was for one download, of this image, from this address.
    other = "sample_00" if image_id != "sample_00" else "sample_01"
    for uri in [download_uri, f"{stack.url}/datastore/image?image={quote_plus(other)}"]:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlretrieve(uri, tmp_path / "again")
        assert caught.value.code == 401
    second = slicer_client().next_sample("random", {})
    # From another address (as a trusted loopback proxy names the client to the gateway): no grant.
    elsewhere = httpx.get(
        f"http://127.0.0.1:{PORTS['--gateway-port']}/datastore/image", params={"image": second["id"]},
        headers={"x-forwarded-for": "10.9.9.9"},
    )  # fmt: skip
    assert elsewhere.status_code == 401
    urllib.request.urlretrieve(f"{stack.url}/datastore/image?image={quote_plus(second['id'])}", tmp_path / "second")
    # After loading, Slicer looks for an `original` label in the datastore listing.
    assert image_id in slicer_client().datastore()["objects"]


def test_every_route_per_role_on_the_whole_stack(stack: Stack) -> None:
    """The REST enumeration of test_auth.py, here with every service up behind Envoy: each route
    of the app with no token, a wrongly signed one and a token of each single role is refused
    (401 / 403) or not exactly per gateway.auth's table. Bodies are an invalid JSON `[]`, so an
    allowed call stops at validation instead of starting a training or scoring run."""
    from tests.fixtures.routes import app_routes, request_for

    routes = [route for route in app_routes() if required_role(*route) not in (PUBLIC, AUTHENTICATED)]
    assert len(routes) > 40
    identities: dict[str, dict[str, str]] = {
        "none": {},
        "wrongly signed": {
            "authorization": f"Bearer {issue_access_token(Identity('p', frozenset(ROLES)), new_signing_key(), 300)}"
        },
        **{
            role: {"authorization": f"Bearer {issue_access_token(Identity('p', frozenset({role})), KEY, 300)}"}
            for role in ROLES
        },
    }
    wrong, answered = {}, set()
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        for who, headers in identities.items():
            for method, template in routes:
                path, params = request_for(method, template)
                body = {"content": b"[]", "headers": {**headers, "content-type": "application/json"}}
                status = http.request(
                    method, path, params=params, **(body if method in ("POST", "PUT") else {"headers": headers})
                ).status_code
                if who in ("none", "wrongly signed"):
                    expected_ok = status == 401
                else:
                    allowed = required_role(method, template) == who
                    expected_ok = status not in (401, 403) if allowed else status == 403
                if not expected_ok:
                    wrong[(who, method, template)] = status
                if status == 200:
                    answered.add((who, method, template))
    assert wrong == {}
    # Allowed calls really reached the services behind the gateway.
    assert {(USER, "GET", "/info/"), (USER, "GET", "/datastore/"), (ADMIN, "GET", "/logs/")} <= answered
