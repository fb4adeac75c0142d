"""The chart's auth values: users from a Secret, a kept signing key, a token per service."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from tests.fixtures.chart import RELEASE, render


def _env(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    deployment = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"{RELEASE}-labelgrid-{component}"
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container.get("env", [])}, deployment  # type: ignore[return-value]


def test_users_signing_key_and_service_tokens(chart: Any) -> None:
    docs = render(chart, {"auth": {"enabled": True, "users": {"existingSecret": "lg-users"}}})
    env, gateway = _env(docs, "gateway")
    assert env["LABELGRID_AUTH_USERS_FILE"]["value"] == "/etc/labelgrid/auth/users.json"
    assert env["LABELGRID_AUTH_SIGNING_KEY"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-labelgrid-auth-keys"
    assert env["LABELGRID_AUTH_SERVICE_TOKEN"]["value"] == "$(LG_SERVICE_TOKEN_GATEWAY)"
    assert "LABELGRID_AUTH_TOKENS" not in env  # no static tokens asked for: none configured (none empty)
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth-users"]["secret"]["secretName"] == "lg-users"
    inference, _ = _env(docs, "inference")
    assert inference["LABELGRID_AUTH_SERVICE_TOKEN"]["value"] == "$(LG_SERVICE_TOKEN_INFERENCE)"
    assert "LABELGRID_AUTH_USERS_FILE" not in inference
    datastore, _ = _env(docs, "datastore")
    assert "LABELGRID_AUTH_SERVICE_TOKEN" not in datastore
    assert "inference=$(LG_SERVICE_TOKEN_INFERENCE)" in datastore["LABELGRID_AUTH_SERVICES"]["value"]
    keys = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == f"{RELEASE}-labelgrid-auth-keys")
    assert set(keys["data"]) == {"signing-key", "gateway", "inference", "training", "activelearning"}
    assert keys["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


@pytest.mark.parametrize(
    "auth",
    [{"enabled": True}, {"enabled": True, "tokens": [""]}, {"enabled": True, "tokens": ["", ""]}],
)
def test_auth_that_would_be_off_does_not_render(chart: Any, auth: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError):
        render(chart, {"auth": auth})


def test_oidc_env_and_egress(chart: Any) -> None:
    oidc = {
        "issuer": "https://kc.example.org/realms/monailabel",
        "jwks": "https://kc.example.org/realms/monailabel/protocol/openid-connect/certs",
        "loginUrl": "https://kc.example.org/realms/monailabel/protocol/openid-connect/token",
        "egressTo": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
    }
    docs = render(chart, {"auth": {"enabled": True, "oidc": oidc}})
    gateway, _ = _env(docs, "gateway")
    datastore, _ = _env(docs, "datastore")
    assert gateway["LABELGRID_AUTH_OIDC_LOGIN_URL"]["value"] == oidc["loginUrl"]
    assert "LABELGRID_AUTH_OIDC_LOGIN_URL" not in datastore
    for env in (gateway, datastore):
        assert env["LABELGRID_AUTH_OIDC_ISSUER"]["value"] == oidc["issuer"]
        assert env["LABELGRID_AUTH_OIDC_ROLES_CLAIM"]["value"] == "realm_access#roles"
    policy = next(
        d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == f"{RELEASE}-labelgrid-datastore"
    )
    assert {"to": oidc["egressTo"], "ports": [{"port": 443, "protocol": "TCP"}]} in policy["spec"]["egress"]
    with pytest.raises(helm.HelmError):
        render(chart, {"auth": {"enabled": True, "oidc": {"issuer": oidc["issuer"]}}})
