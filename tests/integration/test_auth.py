"""Auth with built-in users, MONAI Label's roles and service identities, against a real gateway
and a real datastore (both with auth on).

The enumeration goes over every route of the app (the OpenAPI's and the hidden ones) with no
token, a wrong, an expired and a wrongly signed token, and a token of each single role: every
answer is allowed (not 401/403) or 401/403 exactly per gateway.auth.ROUTE_ROLES, which is
checked against MONAI Label's table here.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from gateway.auth import AUTHENTICATED, PUBLIC, ROUTE_ROLES, required_role
from services.common.auth import (
    ADMIN,
    ANNOTATOR,
    REVIEWER,
    ROLES,
    USER,
    Identity,
    UsersFile,
    issue_access_token,
    issue_download_token,
    new_signing_key,
)
from tests.contract.helpers import nifti_bytes
from tests.fixtures.gateway import GatewayStack
from tests.fixtures.routes import app_routes, request_for

pytestmark = pytest.mark.timeout(180)

KEY = new_signing_key()
GATEWAY_TOKEN = "gateway-service-token-" + "g" * 20
INFERENCE_TOKEN = "inference-service-token-" + "i" * 20
SERVICES = [f"gateway={GATEWAY_TOKEN}", f"inference={INFERENCE_TOKEN}"]
PASSWORDS = {"alice": "alice-pw", "annie": "annie-pw", "uma": "uma-pw", "rita": "rita-pw", "tess": "tess-pw"}
USER_ROLES = {"alice": [ADMIN], "annie": [ANNOTATOR], "uma": [USER], "rita": [REVIEWER], "tess": [USER]}

# MONAI Label 0.8.5's table (monailabel-api-routes.md §2): U, A, D, public.
MONAILABEL_TABLE = """
GET /info/ U|GET /model/{model} D|GET /model/info/{model} D|PUT /model/{model} A|DELETE /model/{model} A
POST /infer/{model} U|POST /infer/wsi_v2/{model} U|POST /infer/wsi/{model} U|GET /batch/infer U
POST /batch/infer/{model} D|DELETE /batch/infer D|GET /train/ U|POST /train/ D|POST /train/{model} D
DELETE /train/ D|POST /activelearning/{strategy} U|GET /scoring/ U|POST /scoring/ A|POST /scoring/{method} A
DELETE /scoring/ A|GET /datastore/ U|PUT /datastore/image A|PUT /datastore/ A|DELETE /datastore/image D
DELETE /datastore/ D|HEAD /datastore/image U|GET /datastore/image U|GET /datastore/image/info U
PUT /datastore/image/info A|PUT /datastore/label A|DELETE /datastore/label D|HEAD /datastore/label U
GET /datastore/label U|GET /datastore/label/info U|PUT /datastore/label/info A|PUT /datastore/updatelabelinfo A
GET /datastore/dataset A|GET /logs/ D|GET /logs/gpu D|GET /session/{session_id} U|PUT /session/ U
DELETE /session/{session_id} U|GET /auth/ -|POST /auth/token -|GET /openapi.json -|GET /docs -|GET / -
"""
LETTERS = {"U": USER, "A": ANNOTATOR, "D": ADMIN, "-": PUBLIC}


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("users") / "users.json"
    users = UsersFile()
    for name, roles in USER_ROLES.items():
        users.add(name, PASSWORDS[name], roles)
    users.save(path)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, users_file: Path) -> Iterator[GatewayStack]:
    auth = {"auth_signing_key": KEY, "auth_services": SERVICES}
    running = GatewayStack(
        tmp_path_factory.mktemp("auth"),
        gateway_overrides={**auth, "auth_users_file": users_file, "auth_service_token": GATEWAY_TOKEN},
        datastore_overrides=auth,
    ).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def url(stack: GatewayStack) -> str:
    return stack.url


def login(url: str, username: str, password: str | None = None) -> str:
    answer = httpx.post(
        f"{url}/auth/token",
        data={"username": username, "password": password or PASSWORDS[username], "grant_type": "password"},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"access_token", "token_type"} and body["token_type"] == "Bearer"
    return body["access_token"]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def role_token(*roles: str, key: str = KEY, ttl: int = 300, now: float | None = None) -> str:
    return issue_access_token(Identity("probe", frozenset(roles)), key, ttl, now=now)


# -- /auth ---------------------------------------------------------------------------


def test_auth_routes_answer_as_monailabel(url: str) -> None:
    assert httpx.get(f"{url}/auth/").json() == {"enabled": True, "client_id": "monailabel-app", "realm": ""}
    token = login(url, "annie")
    claims = jwt.decode(token, KEY, algorithms=["HS256"], audience="labelgrid")
    assert claims["preferred_username"] == "annie"
    assert set(claims["realm_access"]["roles"]) == {ANNOTATOR, USER}  # annotator implies user
    assert 0 < claims["exp"] - claims["iat"] <= 900
    valid = httpx.get(f"{url}/auth/token/valid", headers=bearer(token))
    assert valid.status_code == 200
    assert valid.json() == {"username": "annie", "email": None, "name": None, "roles": [ANNOTATOR, USER]}
    missing = httpx.get(f"{url}/auth/token/valid")
    assert missing.status_code == 401 and missing.json() == {"detail": "Not authenticated"}
    assert missing.headers["www-authenticate"] == "Bearer"
    bad = httpx.get(f"{url}/auth/token/valid", headers=bearer(token + "x"))
    assert bad.status_code == 401 and bad.json() == {"detail": "Could not validate credentials"}


@pytest.mark.parametrize("username, password", [("annie", "wrong"), ("nobody", "annie-pw"), ("annie", "")])
def test_a_wrong_login_is_401_and_gives_no_token(url: str, username: str, password: str) -> None:
    answer = httpx.post(
        f"{url}/auth/token", data={"username": username, "password": password, "grant_type": "password"}
    )
    assert answer.status_code in (401, 422)
    assert "access_token" not in answer.text


def test_password_guessing_is_throttled(url: str) -> None:
    """Five wrong passwords for one user from one address: then even the right one waits (429)."""
    wrong = {"username": "tess", "password": "guess", "grant_type": "password"}
    assert [httpx.post(f"{url}/auth/token", data=wrong).status_code for _ in range(5)] == [401] * 5
    right = httpx.post(f"{url}/auth/token", data={**wrong, "password": PASSWORDS["tess"]})
    assert right.status_code == 429 and "access_token" not in right.text
    assert 0 < int(right.headers["retry-after"]) <= 301
    page = httpx.post(f"{url}/auth/login", data={"username": "tess", "password": PASSWORDS["tess"]})
    assert page.status_code == 429 and "labelgrid_session" not in page.headers.get("set-cookie", "")
    assert login(url, "uma")  # other users are not locked out


def test_only_the_password_grant(url: str) -> None:
    answer = httpx.post(
        f"{url}/auth/token", data={"username": "annie", "password": "annie-pw", "grant_type": "client_credentials"}
    )
    assert answer.status_code == 422


def test_users_added_later_log_in_without_a_restart(url: str, users_file: Path) -> None:
    users = UsersFile.load(users_file)
    users.add("late", "late-pw", [USER])
    users.save(users_file)
    assert httpx.get(f"{url}/info/", headers=bearer(login(url, "late", "late-pw"))).status_code not in (401, 403)


# -- the route table -----------------------------------------------------------------


def test_every_route_has_monailabels_role() -> None:
    expected = {}
    for entry in MONAILABEL_TABLE.replace("\n", "|").split("|"):
        if entry.strip():
            method, path, letter = entry.split()
            expected[(method, path)] = LETTERS[letter]
    for key, role in expected.items():
        assert ROUTE_ROLES[key] == role, key


def test_every_route_of_the_app_is_in_the_table(stack: GatewayStack) -> None:
    missing = [route for route in app_routes(stack) if route not in ROUTE_ROLES]
    assert missing == []


def _call(url: str, method: str, template: str, headers: dict[str, str]) -> int:
    path, params = request_for(method, template)
    return httpx.request(method, f"{url}{path}", params=params, headers=headers, timeout=30).status_code


def _protected_routes(stack: GatewayStack) -> list[tuple[str, str]]:
    return [route for route in app_routes(stack) if required_role(*route) not in (PUBLIC, AUTHENTICATED)]


def test_openapi_lists_only_routes_in_the_table(url: str) -> None:
    spec = httpx.get(f"{url}/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method in operations:
            assert (method.upper(), path) in ROUTE_ROLES, (method, path)


BAD_TOKENS = {
    "none": None,
    "wrong": "not-a-token",
    "expired": role_token(*ROLES, ttl=60, now=time.time() - 3600),
    "wrongly signed": role_token(*ROLES, key=new_signing_key()),
    "other scheme": "basic",
}


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
def test_every_protected_route_is_401_without_a_valid_token(stack: GatewayStack, kind: str) -> None:
    token = BAD_TOKENS[kind]
    headers = {} if token is None else ({"authorization": "Basic YTpi"} if token == "basic" else bearer(token))
    answers = {route: _call(stack.url, *route, headers) for route in _protected_routes(stack)}
    assert {route: status for route, status in answers.items() if status != 401} == {}


@pytest.mark.parametrize("role", ROLES)
def test_each_role_gets_exactly_the_routes_of_the_table(stack: GatewayStack, role: str) -> None:
    headers = bearer(role_token(role))
    wrong = {}
    for route in _protected_routes(stack):
        status = _call(stack.url, *route, headers)
        allowed = required_role(*route) == role
        if (allowed and status in (401, 403)) or (not allowed and status != 403):
            wrong[route] = status
    assert wrong == {}


def test_public_routes_need_no_token(url: str) -> None:
    for method, path in [("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/auth/")]:
        assert httpx.request(method, f"{url}{path}").status_code == 200


def test_a_403_is_monailabels(url: str) -> None:
    answer = httpx.delete(f"{url}/datastore/image", params={"id": "x"}, headers=bearer(login(url, "annie")))
    assert answer.status_code == 403
    assert answer.json() == {"detail": 'Role "monailabel-admin" is required to perform this action'}


def test_auth_is_checked_before_the_body_is_read(url: str) -> None:
    """A 100 MB upload without a token is refused from its headers alone: none of it is sent."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"PUT /datastore/image?image=big HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000000\r\n\r\n"
        )
        answer = sock.recv(4096).decode("latin-1")
    assert answer.startswith("HTTP/1.1 401"), answer[:200]


# -- gRPC: identities forwarded, services as themselves ------------------------------


def test_the_datastore_checks_roles_and_service_identities(stack: GatewayStack) -> None:
    async def calls() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with grpc.aio.insecure_channel(stack.datastore_address) as channel:
            stub = ds_grpc.DatastoreServiceStub(channel)
            cases = {
                "none": ({}, stub.GetStatus, ds_pb.GetStatusRequest()),
                "user status": (bearer(role_token(USER)), stub.GetStatus, ds_pb.GetStatusRequest()),
                "user reindex": (bearer(role_token(USER)), stub.Reindex, ds_pb.ReindexRequest()),
                "inference reindex": (bearer(INFERENCE_TOKEN), stub.Reindex, ds_pb.ReindexRequest()),
                "inference status": (bearer(INFERENCE_TOKEN), stub.GetStatus, ds_pb.GetStatusRequest()),
                "inference deletes": (bearer(INFERENCE_TOKEN), stub.DeleteImage, ds_pb.DeleteImageRequest(name="images/x")),
                "gateway deletes": (bearer(GATEWAY_TOKEN), stub.DeleteImage, ds_pb.DeleteImageRequest(name="images/x")),
                "token with a service's name": (
                    bearer(issue_access_token(Identity("service:inference", frozenset()), KEY, 60)),
                    stub.GetStatus, ds_pb.GetStatusRequest(),
                ),
            }  # fmt: skip
            for name, (headers, method, request) in cases.items():
                try:
                    await method(request, metadata=tuple(headers.items()), timeout=10)
                    out[name] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as err:
                    out[name] = err.code()
        return out

    import asyncio

    got = asyncio.run(calls())
    assert got == {
        "none": grpc.StatusCode.UNAUTHENTICATED,
        "user status": grpc.StatusCode.OK,
        "user reindex": grpc.StatusCode.PERMISSION_DENIED,
        "inference reindex": grpc.StatusCode.PERMISSION_DENIED,
        "inference status": grpc.StatusCode.OK,
        "inference deletes": grpc.StatusCode.PERMISSION_DENIED,
        "gateway deletes": grpc.StatusCode.PERMISSION_DENIED,  # sessions are not images any more
        "token with a service's name": grpc.StatusCode.PERMISSION_DENIED,  # a user without roles
    }


def test_a_user_creating_a_session_over_grpc_owns_it(stack: GatewayStack) -> None:
    """The owner a session counts against is the calling user, not what the header claims;
    the gateway (a service) names the owner itself."""
    data = nifti_bytes(seed=5)

    async def create(headers: dict[str, str]) -> Any:
        async def stream() -> Any:
            header = ds_pb.CreateSessionHeader(file_name="a.nii.gz", owner="client:someone-else")
            yield ds_pb.CreateSessionRequest(header=header)
            yield ds_pb.CreateSessionRequest(chunk=data)
            yield ds_pb.CreateSessionRequest(finish=common_pb2.UploadFinish(sha256=hashlib.sha256(data).hexdigest()))

        async with grpc.aio.insecure_channel(stack.datastore_address) as channel:
            stub = ds_grpc.DatastoreServiceStub(channel)
            session = (await stub.CreateSession(stream(), metadata=tuple(headers.items()), timeout=10)).session
            await stub.DeleteSession(
                ds_pb.DeleteSessionRequest(name=session.name), metadata=tuple(headers.items()), timeout=10
            )
            return session

    import asyncio

    assert asyncio.run(create(bearer(role_token(USER)))).owner == "user:probe"
    assert asyncio.run(create(bearer(GATEWAY_TOKEN))).owner == "client:someone-else"


# -- the official client, label audit, signed downloads ------------------------------


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def monailabel_client(url: str, tmp_path: Path, username: str) -> MONAILabelClient:
    client = MONAILabelClient(url, tmpdir=str(tmp_path), client_id="says-someone-else")
    assert client.auth_enabled() is True
    client.update_auth(client.auth_token(username, PASSWORDS[username]))
    assert client.auth_valid_token() is True
    return client


def test_the_official_client_logs_in_and_works_per_role(url: str, tmp_path: Path) -> None:
    annie = monailabel_client(url, tmp_path, "annie")
    uma = monailabel_client(url, tmp_path, "uma")
    image = write(tmp_path / "scan.nii.gz", nifti_bytes(seed=1))
    label = write(tmp_path / "scan_seg.nii.gz", nifti_bytes(seed=2, dtype="uint8"))

    assert annie.upload_image(image, "authimg", {}) == {"image": "authimg"}
    assert (
        annie.save_label("authimg", label, params={"label_info": [{"name": "spleen", "idx": 1}]})["image"] == "authimg"
    )
    with pytest.raises(MONAILabelClientException) as caught:
        uma.upload_image(image, "by_user", {})
    assert "Status: 403" in str(caught.value)

    entry = uma.datastore()["objects"]["authimg"]
    assert entry["image"]["info"]["user"] == "annie"
    assert entry["labels"]["final"]["info"]["user"] == "annie"  # who saved, not the client_id
    assert Path(uma.download_label("authimg", "final")).read_bytes() == Path(label).read_bytes()
    # A fresh client: the official client's multipart calls write their content-type into its
    # auth headers (client.py http_multipart), which breaks its next requests-based upload.
    uma = monailabel_client(url, tmp_path, "uma")
    session = uma.create_session(write(tmp_path / "local.nii.gz", nifti_bytes(seed=3)))
    assert uma.get_session(session["session_id"])["name"] == session["session_id"]
    uma.remove_session(session["session_id"])

    anonymous = MONAILabelClient(url, tmpdir=str(tmp_path))
    with pytest.raises(MONAILabelClientException) as caught:
        anonymous.datastore()
    assert "Status: 401" in str(caught.value)


def test_signed_download_links_are_bound_to_the_image(url: str, tmp_path: Path) -> None:
    annie = monailabel_client(url, tmp_path, "annie")
    annie.upload_image(write(tmp_path / "dl.nii.gz", nifti_bytes(seed=5)), "dlimg", {})
    token = issue_download_token("dlimg", "uma", KEY, 60)
    ok = httpx.get(f"{url}/datastore/image", params={"image": "dlimg", "token": token})
    assert ok.status_code == 200 and ok.content == nifti_bytes(seed=5)
    other = httpx.get(f"{url}/datastore/image", params={"image": "authimg", "token": token})
    assert other.status_code == 401
    elsewhere = httpx.get(f"{url}/datastore/image/info", params={"image": "dlimg", "token": token})
    assert elsewhere.status_code == 401
    expired = issue_download_token("dlimg", "uma", KEY, 60, now=time.time() - 600)
    assert httpx.get(f"{url}/datastore/image", params={"image": "dlimg", "token": expired}).status_code == 401
    # An access token is no download token, and a download token is no access token.
    assert httpx.get(f"{url}/datastore/image", params={"image": "dlimg", "token": login(url, "uma")}).status_code == 401
    assert httpx.get(f"{url}/info/", headers=bearer(token)).status_code == 401


# -- labelgrid users add -------------------------------------------------------------


def test_users_add_reads_the_password_from_stdin(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    argv = [sys.executable, "-m", "gateway.cli", "users", "add", "bob", "--role", USER, "--role", ANNOTATOR,
            "--users-file", str(path)]  # fmt: skip
    done = subprocess.run(argv, input="s3cret pass\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    stored = json.loads(path.read_text())
    assert stored["users"]["bob"]["roles"] == [USER, ANNOTATOR]
    assert "s3cret" not in path.read_text() and stored["users"]["bob"]["password_hash"].startswith("$argon2id$")
    assert UsersFile.load(path).verify("bob", "s3cret pass") is not None
    assert UsersFile.load(path).verify("bob", "s3cret") is None
    bad = subprocess.run(
        [*argv[:6], "--role", "monailabel-boss", *argv[10:]], input="x\n", capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


# -- fail closed ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, argv, why",
    [
        ({"LABELGRID_AUTH_TOKENS": ""}, [], "set but empty"),
        ({"LABELGRID_AUTH_TOKENS": " , "}, [], "set but empty"),
        ({"LABELGRID_AUTH_SIGNING_KEY": ""}, [], "at least 32 bytes"),
        ({"LABELGRID_AUTH_SERVICES": "inference="}, [], "name=token"),
        ({"LABELGRID_AUTH_SIGNING_KEY": "k" * 40}, ["--auth-users-file", "EMPTY"], "has no users"),
        ({}, ["--auth-users-file", "EMPTY"], "needs auth_signing_key"),
    ],
)
def test_auth_configured_but_empty_refuses_to_start(
    tmp_path: Path, env: dict[str, str], argv: list[str], why: str
) -> None:
    import os

    empty = tmp_path / "users.json"
    empty.write_text('{"users": {}}')
    argv = [str(empty) if arg == "EMPTY" else arg for arg in argv]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LABELGRID_")}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--port", "0", "--metrics-port", "-1", *argv],
        env={**clean, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and why in done.stderr, done.stderr[-2000:]


def test_up_warns_loudly_on_a_public_address_without_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import cli

    said: list[str] = []
    monkeypatch.delenv("LABELGRID_AUTH_TOKENS", raising=False)
    monkeypatch.delenv("LABELGRID_AUTH_SIGNING_KEY", raising=False)
    monkeypatch.setattr(cli, "make_say", lambda *_: lambda line, source="labelgrid": said.append(line))
    monkeypatch.setattr(cli, "build_stack", lambda *_: (_ for _ in ()).throw(SystemExit(3)))
    # The default ports may be held by other servers of the suite: the port check (tested in
    # tests/docs/test_troubleshooting.py) would end up() before the warning this test is about.
    monkeypatch.setattr(cli, "port_problems", lambda *_: [])
    args = cli.build_parser().parse_args(["up", "--host", "0.0.0.0", "--work-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.up(args)
    assert any("WITHOUT AUTH" in line for line in said)
    said.clear()
    args = cli.build_parser().parse_args(["up", "--host", "127.0.0.1", "--work-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.up(args)
    assert not any("WITHOUT AUTH" in line for line in said)


# -- every RPC of the datastore, per identity -----------------------------------------


def _datastore_methods() -> list[Any]:
    from google.protobuf import descriptor_pool

    return list(descriptor_pool.Default().FindServiceByName("labelgrid.datastore.v1.DatastoreService").methods)


async def _status_of(channel: grpc.aio.Channel, method: Any, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    """Calls `method` with an empty request (or no messages) and returns the status code."""
    path = f"/labelgrid.datastore.v1.DatastoreService/{method.name}"
    identity = (lambda data: data, lambda data: data)
    try:
        if method.client_streaming:
            shape = channel.stream_stream if method.server_streaming else channel.stream_unary
            call = shape(path, *identity)(iter(()), metadata=metadata, timeout=10)
        else:
            shape = channel.unary_stream if method.server_streaming else channel.unary_unary
            call = shape(path, *identity)(b"", metadata=metadata, timeout=10)
        if method.server_streaming:
            async for _ in call:
                break
            call.cancel()
        else:
            await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_every_datastore_rpc_per_identity(stack: GatewayStack) -> None:
    from services.common.auth_methods import AT_LEAST, METHOD_RULES

    methods = _datastore_methods()
    identities = {
        "none": (),
        "wrong": bearer("not-a-token"),
        "expired": bearer(BAD_TOKENS["expired"]),
        "wrongly signed": bearer(BAD_TOKENS["wrongly signed"]),
        **{role: bearer(role_token(role)) for role in ROLES},
        "gateway": bearer(GATEWAY_TOKEN),
        "inference": bearer(INFERENCE_TOKEN),
    }

    async def run() -> dict[tuple[str, str], grpc.StatusCode]:
        out = {}
        async with grpc.aio.insecure_channel(stack.datastore_address) as channel:
            for who, headers in identities.items():
                metadata = tuple(headers.items()) if isinstance(headers, dict) else ()
                for method in methods:
                    if method.name == "Reindex" and who in (ADMIN,):
                        continue  # allowed, and would rescan the studies folder: nothing to learn
                    out[(who, method.name)] = await _status_of(channel, method, metadata)
        return out

    import asyncio

    got = asyncio.run(run())
    wrong = {}
    for (who, name), code in got.items():
        rule = METHOD_RULES[f"/labelgrid.datastore.v1.DatastoreService/{name}"]
        if who in ("none", "wrong", "expired", "wrongly signed"):
            expected_denied, denied_code = True, grpc.StatusCode.UNAUTHENTICATED
        elif who in ROLES:
            expected_denied, denied_code = who not in AT_LEAST[rule.role], grpc.StatusCode.PERMISSION_DENIED
        else:
            expected_denied, denied_code = who not in rule.services, grpc.StatusCode.PERMISSION_DENIED
        if expected_denied != (code == denied_code) or (
            code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) and code != denied_code
        ):
            wrong[(who, name)] = code
    assert len(got) > 250 and wrong == {}


def test_changes_are_audited_with_the_authenticated_user(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="labelgrid.audit")
    annie = monailabel_client(url, tmp_path, "annie")
    annie.upload_image(write(tmp_path / "audited.nii.gz", nifti_bytes(seed=9)), "audited", {})
    forbidden = httpx.delete(f"{url}/datastore/image", params={"id": "audited"}, headers=bearer(login(url, "annie")))
    assert forbidden.status_code == 403
    records = [r for r in caplog.records if r.name == "labelgrid.audit"]
    upload = [r for r in records if getattr(r, "route", "") == "/datastore/" and getattr(r, "method", "") == "PUT"]
    assert upload and upload[-1].user == "annie" and upload[-1].status == 200 and "image=audited" in upload[-1].query
    assert any(r.route == "/auth/token" and r.user == "annie" for r in records)
    assert any(r.route == "/datastore/image" and r.method == "DELETE" and r.status == 403 for r in records)


def test_reflection_needs_an_identity(stack: GatewayStack) -> None:
    """Reflection lists every method (the admin ones too): no token, no listing."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    def services(metadata: tuple[tuple[str, str], ...]) -> list[str]:
        with grpc.insecure_channel(stack.datastore_address) as channel:
            if metadata:
                channel = grpc.intercept_channel(channel, _Metadata(metadata))
            return list(ProtoReflectionDescriptorDatabase(channel).get_services())

    with pytest.raises(grpc.RpcError) as caught:
        services(())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        services((("authorization", f"Bearer {BAD_TOKENS['wrongly signed']}"),))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "labelgrid.datastore.v1.DatastoreService" in services((("authorization", f"Bearer {role_token(USER)}"),))
    assert "labelgrid.datastore.v1.DatastoreService" in services((("authorization", f"Bearer {INFERENCE_TOKEN}"),))


class _Metadata(grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata to the reflection stream (its client takes no metadata argument)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        details = details._replace(metadata=(*(details.metadata or ()), *self.metadata))
        return continuation(details, requests)
