"""`labelgrid up --auth-users FILE`: the whole stack with auth on, through Envoy.

The supervisor's own ready checks authenticate (the stack comes up), the services reach the
datastore as themselves (next sample, inference), the official client logs in and works, and
nothing answers without a token.
"""

from __future__ import annotations

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

from services.common.auth import ADMIN, USER, UsersFile
from tests.integration.test_labelgrid_up import UP, Stack, port_flags, stop_stack
from tests.ports import free_ports

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("auth-up")
    users = UsersFile()
    users.add("alice", "alice-pw", [ADMIN])
    users.add("uma", "uma-pw", [USER])
    users.save(root / "users.json")
    flags = port_flags()
    ports = dict(zip(flags, free_ports(len(flags)), strict=True))
    argv = [
        sys.executable, "-m", "gateway.cli", "up", "--studies", str(root / "studies"), "--work-dir", str(root / "var"),
        "--device", "cpu", "--train-device", "cpu", "--scoring-device", "cpu", "--sample-studies",
        "--auth-users", str(root / "users.json"),
    ]  # fmt: skip
    for flag, port in ports.items():
        argv += [flag, str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    assert httpx.get(sample["path"].split("&token=")[0], timeout=30).status_code == 401
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
