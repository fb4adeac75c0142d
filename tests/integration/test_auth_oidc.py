"""OIDC: an issuer's RS256 tokens, keys from a JWKS served on loopback (made in the test),
key rotation, clock skew, algorithm confusion; and a gateway + datastore that accept them with
MONAI Label's claims (`preferred_username`, `realm_access.roles`) and pass the login on."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.common.auth import ADMIN, ANNOTATOR, USER, Authenticator, JwksKeys, OidcSettings, OidcVerifier, TokenError
from tests.contract.helpers import nifti_bytes
from tests.fixtures.gateway import GatewayStack
from tests.fixtures.polling import eventually, wait_until

pytestmark = pytest.mark.timeout(120)

ISSUER = "http://127.0.0.1/realms/monailabel"


class Issuer:
    """RSA keys, the JWKS they publish (served on loopback) and a password-grant token endpoint."""

    def __init__(self) -> None:
        self.keys = {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048) for kid in ("k1", "k2")}
        self.published = ["k1"]
        self.fetches = 0
        self.gate: threading.Event | None = None
        self.fetching = threading.Event()
        self.gate_was_opened = False
        self.users = {"olga": ("olga-pw", [USER, ANNOTATOR])}
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                issuer.fetches += 1
                if issuer.gate is not None:  # held until the test lets it answer
                    issuer.fetching.set()
                    issuer.gate_was_opened = issuer.gate.wait(30)
                self._send(200, issuer.jwks())

            def do_POST(self) -> None:
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["content-length"])).decode())
                user = issuer.users.get(form.get("username", [""])[0])
                if form.get("grant_type") != ["password"] or user is None or form.get("password", [""])[0] != user[0]:
                    self._send(401, {"error": "invalid_grant"})
                    return
                token = issuer.token(form["username"][0], user[1], aud=form.get("client_id", [""])[0])
                self._send(200, {"access_token": token, "token_type": "Bearer", "expires_in": 300})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid in self.published:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key()))
            keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return {"keys": keys}

    def token(self, user: str, roles: list[str], kid: str = "k1", aud: str = "monailabel-app", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": aud, "sub": f"id-{user}", "preferred_username": user,
                "realm_access": {"roles": roles}, "iat": now, "exp": now + 300, **claims}  # fmt: skip
        return jwt.encode(body, self.keys[kid], algorithm="RS256", headers={"kid": kid})


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    running = Issuer()
    yield running
    running.server.shutdown()


def verifier(issuer: Issuer, **settings: Any) -> OidcVerifier:
    keys = JwksKeys(f"{issuer.url}/jwks", min_refetch_seconds=0)
    return OidcVerifier(OidcSettings(ISSUER, f"{issuer.url}/jwks", **settings), keys)


def test_an_issuers_token_gives_its_user_and_roles(issuer: Issuer) -> None:
    identity = verifier(issuer, audience="monailabel-app").verify(issuer.token("olga", [USER, ANNOTATOR]))
    assert identity.username == "olga" and identity.roles == {USER, ANNOTATOR} and identity.service is None


@pytest.mark.parametrize(
    "change",
    [
        "other issuer",
        "other audience",
        "expired beyond the skew",
        "signed by a key it does not publish",
        "hs256 with the public key",
    ],
)
def test_tokens_the_issuer_did_not_mean_are_refused(issuer: Issuer, change: str) -> None:
    check = Authenticator(oidc=verifier(issuer, audience="monailabel-app"))
    if change == "other issuer":
        token = issuer.token("olga", [ADMIN], iss="http://evil.example/realms/x")
    elif change == "other audience":
        token = issuer.token("olga", [ADMIN], aud="another-app")
    elif change == "expired beyond the skew":
        token = issuer.token("olga", [ADMIN], exp=int(time.time()) - 120)
    elif change == "signed by a key it does not publish":
        token = jwt.encode({"iss": ISSUER, "aud": "monailabel-app", "preferred_username": "olga", "exp": int(time.time()) + 60},
                           rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
                           headers={"kid": "k1"})  # fmt: skip
    else:
        # Algorithm confusion: the issuer's public key used as an HMAC secret.
        public = (
            issuer.keys["k1"]
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        token = _hs256_with(public)
    assert check.authenticate(token) is None


def _hs256_with(secret: bytes) -> str:
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    payload = b64(
        json.dumps(
            {"iss": ISSUER, "aud": "monailabel-app", "preferred_username": "olga", "exp": int(time.time()) + 60}
        ).encode()
    )
    signature = b64(hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    return f"{header}.{payload}.{signature}"


def test_a_little_clock_skew_is_tolerated(issuer: Issuer) -> None:
    token = issuer.token("olga", [USER], exp=int(time.time()) - 20)
    assert verifier(issuer).verify(token).username == "olga"


def test_rotated_keys_are_fetched_and_unknown_kids_do_not_loop(issuer: Issuer) -> None:
    keys = JwksKeys(f"{issuer.url}/jwks", min_refetch_seconds=3600)
    check = OidcVerifier(OidcSettings(ISSUER, f"{issuer.url}/jwks"), keys)
    assert check.verify(issuer.token("olga", [USER], kid="k1")).username == "olga"
    before = issuer.fetches
    for _ in range(5):  # made-up kids: one fetch at most per min_refetch_seconds
        with pytest.raises(TokenError):
            check.verify(issuer.token("olga", [USER], kid="k2"))
    assert issuer.fetches == before
    issuer.published = ["k2"]  # the issuer rotates
    try:
        keys.min_refetch_seconds = 0
        assert check.verify(issuer.token("olga", [USER], kid="k2")).username == "olga"
        assert issuer.fetches == before + 1
    finally:
        issuer.published = ["k1"]


def test_the_key_set_is_fetched_off_the_event_loop(issuer: Issuer) -> None:
    """While the JWKS answer is held back, the event loop keeps running: the coroutine that
    lets the answer go runs during the fetch (a fetch on the loop would wait for it in vain)."""
    check = Authenticator(oidc=OidcVerifier(OidcSettings(ISSUER, f"{issuer.url}/jwks"), JwksKeys(f"{issuer.url}/jwks")))
    token = issuer.token("olga", [USER])

    async def run() -> list[Any]:
        pending = [asyncio.create_task(check.aauthenticate(token)) for _ in range(5)]
        await eventually(issuer.fetching.is_set, "the key set fetch to start", timeout=10)
        assert issuer.gate is not None
        issuer.gate.set()
        return await asyncio.gather(*pending)

    issuer.gate, issuer.fetching = threading.Event(), threading.Event()
    before = issuer.fetches
    try:
        identities = asyncio.run(run())
    finally:
        issuer.gate = None
    assert issuer.gate_was_opened
    assert [identity.username for identity in identities] == ["olga"] * 5
    assert issuer.fetches == before + 1  # five callers, one fetch


def test_rotation_off_the_event_loop(issuer: Issuer) -> None:
    keys = JwksKeys(f"{issuer.url}/jwks", refresh_seconds=3600, min_refetch_seconds=3600)
    check = Authenticator(oidc=OidcVerifier(OidcSettings(ISSUER, f"{issuer.url}/jwks"), keys))
    assert asyncio.run(check.aauthenticate(issuer.token("olga", [USER], kid="k1"))) is not None
    before = issuer.fetches
    issuer.published = ["k1", "k2"]  # the issuer rotates
    try:
        # A made-up or new kid within min_refetch_seconds: refused, no fetch.
        assert asyncio.run(check.aauthenticate(issuer.token("olga", [USER], kid="k2"))) is None
        assert issuer.fetches == before
        keys.min_refetch_seconds = 0
        assert asyncio.run(check.aauthenticate(issuer.token("olga", [USER], kid="k2"))) is not None
        assert issuer.fetches == before + 1
        # Keys past refresh_seconds still serve at once; a background thread re-reads the set.
        keys.refresh_seconds = 0
        assert asyncio.run(check.aauthenticate(issuer.token("olga", [USER], kid="k1"))) is not None
        wait_until(lambda: issuer.fetches >= before + 2, "a background refresh", timeout=30, interval=0.01)
        # Clock skew still tolerated on the async path.
        late = issuer.token("olga", [USER], kid="k2", exp=int(time.time()) - 20)
        assert asyncio.run(check.aauthenticate(late)) is not None
    finally:
        issuer.published = ["k1"]


def test_a_jwks_file_works_too(issuer: Issuer, tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    check = OidcVerifier(OidcSettings(ISSUER, str(path)))
    assert check.verify(issuer.token("olga", [USER])).roles == {USER}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, issuer: Issuer) -> Iterator[GatewayStack]:
    oidc = {"auth_oidc_issuer": ISSUER, "auth_oidc_jwks": f"{issuer.url}/jwks", "auth_oidc_audience": "monailabel-app"}
    running = GatewayStack(
        tmp_path_factory.mktemp("oidc"),
        gateway_overrides={**oidc, "auth_oidc_login_url": f"{issuer.url}/token"},
        datastore_overrides=oidc,
    ).start()
    yield running
    running.stop()


def test_the_gateway_and_datastore_take_issuer_tokens(stack: GatewayStack, issuer: Issuer) -> None:
    url = stack.url
    assert httpx.get(f"{url}/auth/").json() == {"enabled": True, "client_id": "monailabel-app", "realm": ISSUER}
    login = httpx.post(f"{url}/auth/token", data={"username": "olga", "password": "olga-pw", "grant_type": "password"})
    assert login.status_code == 200 and set(login.json()) == {"access_token", "token_type"}
    headers = {"authorization": f"Bearer {login.json()['access_token']}"}
    assert httpx.get(f"{url}/auth/token/valid", headers=headers).json()["username"] == "olga"
    files = {"file": ("oidc.nii.gz", nifti_bytes(seed=11)), "params": (None, "{}")}
    assert (
        httpx.put(f"{url}/datastore/image", params={"image": "oidc_img"}, files=files, headers=headers).status_code
        == 200
    )
    assert (
        httpx.get(f"{url}/datastore/", params={"output": "all"}, headers=headers).json()["objects"]["oidc_img"][
            "image"
        ]["info"]["user"]
        == "olga"
    )
    # olga is no admin.
    assert httpx.delete(f"{url}/datastore/image", params={"id": "oidc_img"}, headers=headers).status_code == 403
    wrong = httpx.post(f"{url}/auth/token", data={"username": "olga", "password": "nope", "grant_type": "password"})
    assert wrong.status_code == 401
