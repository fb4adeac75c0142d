"""Settings of the REST gateway (env LABELGRID_*, or flags), like every labelgrid service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pydantic
from pydantic import field_validator
from pydantic_settings import NoDecode

from services.common.settings import ServiceSettings, _split_list


class GatewaySettings(ServiceSettings):
    """Where the gateway listens (HTTP) and which gRPC services it translates to."""

    # HTTP listen address (MONAI Label's --host/--port); port 0 picks a free one (tests).
    host: str = "127.0.0.1"
    port: Annotated[int, pydantic.Field(ge=0, le=65535)] = 8001
    datastore_address: str = "127.0.0.1:50051"
    inference_address: str = "127.0.0.1:50052"
    training_address: str = "127.0.0.1:50053"
    activelearning_address: str = "127.0.0.1:50054"
    # Seconds a unary call may take; streams (uploads, downloads, inference) have their own.
    rpc_timeout_seconds: Annotated[float, pydantic.Field(gt=0)] = 30.0
    # Deadline of a stream call made without its own (uploads, downloads, exports, waiting for a
    # job with run_sync): every gateway call carries a deadline, none waits forever.
    stream_timeout_seconds: Annotated[float, pydantic.Field(gt=0)] = 6 * 3600.0
    # Seconds /info/ waits for a service in info_wait_for that has not answered yet, before
    # it answers 503 with Retry-After (MONAI Label answers only once its app is loaded).
    info_timeout_seconds: Annotated[float, pydantic.Field(gt=0)] = 3.0
    # Services /info/ needs (inference, training, activelearning); one left out is a stack
    # without it: its sections are empty when it does not answer.
    info_wait_for: Annotated[list[str], NoDecode] = pydantic.Field(
        default_factory=lambda: ["inference", "training", "activelearning"]
    )

    @field_validator("info_wait_for", mode="before")
    @classmethod
    def _split_services(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("info_wait_for")
    @classmethod
    def _known_services(cls, value: list[str]) -> list[str]:
        unknown = set(value) - {"inference", "training", "activelearning"}
        if unknown:
            raise ValueError(f"info_wait_for: unknown services {sorted(unknown)}")
        return value

    # GET /datastore/image answered with a 307 to a short-lived presigned GET on S3 (the
    # datastore's s3_public_endpoint, which clients must reach), after the auth check: the
    # bytes skip Envoy, the gateway and the datastore. Only a datastore on S3 with a public
    # endpoint signs such URLs; elsewhere the gateway streams, as with this off. Labels are
    # redirected only on request (?redirect=true): MONAI Label's client reads them with
    # http.client, which follows no redirect. A request with an Authorization header is
    # redirected only on request too (a client that follows redirects with urllib would carry
    # the token to S3); ?redirect=false always streams.
    download_redirect: bool = False
    # Lifetime of those URLs: S3 checks it when the GET starts, not while the body flows.
    download_redirect_seconds: Annotated[int, pydantic.Field(ge=10, le=3600)] = 60
    # Seconds one inference may take, queue wait included.
    infer_timeout_seconds: Annotated[float, pydantic.Field(gt=0)] = 600.0
    # MONAI Label's MONAI_LABEL_SESSIONS and MONAI_LABEL_SESSION_EXPIRY.
    sessions_enabled: bool = True
    # The lifetime a session gets when PUT /session/ names none (or more); the datastore holds
    # the sessions, their caps (sessions_per_client, sessions_max) and its own longest lifetime.
    session_expiry: Annotated[int, pydantic.Field(gt=0)] = 3600
    # MONAI Label's MONAI_LABEL_CORS_ORIGINS; the request Origin is echoed with credentials.
    cors_origins: Annotated[list[str], NoDecode] = pydantic.Field(default_factory=lambda: ["*"])
    # The log GET /logs/ tails (`labelgrid up` writes the whole stack's output there); unset:
    # the gateway's own recent records, kept in memory.
    log_file: Path | None = None
    # The DICOMweb server behind /proxy/dicom/* and OHIF (MONAI Label's --studies http://...);
    # empty: none. Credentials (basic or bearer) are added server-side, never logged.
    dicomweb_url: str = ""
    dicomweb_username: str = ""
    dicomweb_password: pydantic.SecretStr = pydantic.SecretStr("")
    dicomweb_token: pydantic.SecretStr = pydantic.SecretStr("")
    # MONAI Label's MONAI_LABEL_{QIDO,WADO,STOW}_PREFIX: path prefixes under dicomweb_url.
    dicomweb_qido_prefix: str = ""
    dicomweb_wado_prefix: str = ""
    dicomweb_stow_prefix: str = ""
    # Seconds the proxy waits to connect to, and between bytes from, the DICOMweb server.
    dicomweb_timeout_seconds: Annotated[float, pydantic.Field(gt=0)] = 30.0
    # The built OHIF viewer served at /ohif/; empty: the one in MONAI Label's wheel.
    ohif_dir: str = ""
    # Shown in /info/ when the inference service does not answer.
    app_name: str = "labelgrid"
    app_description: str = "MONAI Label on labelgrid"

    # The addresses whose X-Forwarded-For the gateway believes (uvicorn's forwarded_allow_ips:
    # IPs or CIDRs). Envoy in front is on loopback; behind an Ingress add its pods' network,
    # or every client has the Ingress's address (Slicer's download grants match the address).
    forwarded_allow_ips: Annotated[list[str], NoDecode] = pydantic.Field(default_factory=lambda: ["127.0.0.1"])
    # The origins (scheme://host[:port]) browsers reach the gateway by, for the CSRF check of
    # OHIF's session cookie; empty: the request's Host (right unless a proxy rewrites Host).
    public_origins: Annotated[list[str], NoDecode] = pydantic.Field(default_factory=list)

    @field_validator("cors_origins", "forwarded_allow_ips", "public_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("public_origins")
    @classmethod
    def _whole_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            scheme, sep, rest = origin.partition("://")
            if scheme.lower() not in ("http", "https") or not sep or not rest.strip("/"):
                raise ValueError(f"public origin {origin!r} must look like https://host[:port]")
        return value

    # Auth (services.common.auth; the token fields are ServiceSettings'): built-in users, as
    # `labelgrid users add` writes them; logging in needs auth_signing_key too.
    auth_users_file: Path | None = None
    # Lifetime of the access tokens POST /auth/token issues, and of signed download links.
    auth_access_ttl_seconds: Annotated[int, pydantic.Field(ge=30, le=86400)] = 900
    auth_download_ttl_seconds: Annotated[int, pydantic.Field(ge=10, le=3600)] = 300
    # Stock Slicer downloads the next sample with no header and no token (gateway.auth
    # DownloadGrants): one tokenless GET of that image, from the address that asked for it,
    # within auth_download_ttl_seconds. False: Slicer's download needs a changed plugin.
    auth_slicer_download_grants: bool = True
    # GET /auth/'s client_id and realm (MONAI_LABEL_AUTH_CLIENT_ID / _REALM_URI).
    auth_client_id: str = "monailabel-app"
    auth_realm: str = ""
    # OIDC: the issuer's token endpoint, to which POST /auth/token passes the password grant on
    # (as MONAI Label does with Keycloak) when there is no users file.
    auth_oidc_login_url: str | None = None
