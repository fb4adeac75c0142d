"""The CSRF check of OHIF's session cookie (gateway.auth.cross_origin): against the request's
Host by default, against the configured public origins when a proxy in front rewrites Host."""

from __future__ import annotations

import pytest

from gateway.auth import cross_origin
from gateway.settings import GatewaySettings

PUBLIC = ["https://label.example.org"]


def headers(**values: str) -> dict[bytes, bytes]:
    return {name.encode(): value.encode() for name, value in values.items()}


@pytest.mark.parametrize(
    ("request_headers", "method", "public", "allowed"),
    [
        # Host decides when no public origin is configured.
        (headers(host="gw:8000", origin="http://gw:8000"), "POST", [], True),
        (headers(host="gw:8000", origin="http://evil.example"), "POST", [], False),
        (headers(host="gw:8000", origin="null"), "POST", [], False),
        # A proxy rewrote Host to the service name: the public origin decides, scheme included.
        (headers(host="gateway:8000", origin="https://label.example.org"), "POST", PUBLIC, True),
        (headers(host="gateway:8000", origin="http://label.example.org"), "POST", PUBLIC, False),
        (headers(host="gateway:8000", origin="https://label.example.org:8443"), "POST", PUBLIC, False),
        # With public origins set, matching the (internal) Host is not enough.
        (headers(host="gateway:8000", origin="http://gateway:8000"), "POST", PUBLIC, False),
        (headers(host="gateway:8000", referer="https://LABEL.example.org/ohif/viewer"), "PUT", PUBLIC, True),
        (headers(host="gateway:8000", referer="https://evil.example/ohif/"), "PUT", PUBLIC, False),
        # A malformed Origin or Referer never matches a public origin.
        (headers(host="gateway:8000", origin="garbage"), "POST", PUBLIC, False),
        (headers(host="gateway:8000", referer="/ohif/viewer"), "PUT", PUBLIC, False),
        # A change needs Origin or Referer; a read without either is a same-origin navigation.
        (headers(host="gateway:8000"), "DELETE", PUBLIC, False),
        (headers(host="gateway:8000"), "GET", PUBLIC, True),
    ],
)
def test_cross_origin(request_headers: dict[bytes, bytes], method: str, public: list[str], allowed: bool) -> None:
    why = cross_origin(request_headers, method, public)
    assert (why is None) is allowed, why


def test_public_origins_and_forwarded_ips_come_from_comma_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELGRID_PUBLIC_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("LABELGRID_FORWARDED_ALLOW_IPS", "127.0.0.1,10.0.0.0/8")
    settings = GatewaySettings()
    assert settings.public_origins == ["https://a.example", "https://b.example"]
    assert settings.forwarded_allow_ips == ["127.0.0.1", "10.0.0.0/8"]
    assert GatewaySettings.model_fields["forwarded_allow_ips"].default_factory() == ["127.0.0.1"]  # type: ignore[misc]


@pytest.mark.parametrize("bad", ["label.example.org", "ftp://label.example.org", "https://"])
def test_a_public_origin_must_be_a_whole_origin(bad: str) -> None:
    with pytest.raises(ValueError, match="must look like"):
        GatewaySettings(public_origins=[bad])
