"""Settings every gRPC service shares, from env vars (LABELGRID_*) and command-line flags.

A service subclasses `ServiceSettings` with its own fields; `parse_settings` derives one
flag per field (``s3_secure`` -> ``--s3-secure/--no-s3-secure``), so a new field needs no
parser code. Flags win over env vars, env vars over defaults. Built once in ``__main__``
and passed in: there is no global settings object.
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pydantic
from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.common.auth import check_signing_key, parse_service_credentials
from services.common.chunks import CHUNK_SIZE
from services.common.formats import DEFAULT_LIMITS, VolumeLimits

SettingsT = TypeVar("SettingsT", bound="ServiceSettings")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_MIN_MESSAGE_BYTES = CHUNK_SIZE + 64 * 1024


def _split_list(value: Any) -> Any:
    """Accepts ``a,b`` (env var or flag) as well as a real list."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class ServiceSettings(BaseSettings):
    """What every labelgrid gRPC service needs to run: where to listen, metrics, logs, auth."""

    model_config = SettingsConfigDict(env_prefix="LABELGRID_", extra="ignore")

    host: str = "127.0.0.1"
    # 0 picks a free port (tests); the bound one is GrpcService.port.
    port: int = 0
    metrics_host: str = "127.0.0.1"
    # 0 picks a free port, -1 turns the metrics endpoint off.
    metrics_port: int = 0
    log_level: str = "INFO"
    log_format: Literal["console", "json"] = "console"
    # On SIGTERM, in-flight RPCs get this long to finish before they are cancelled.
    grace_seconds: float = 10.0
    # Largest gRPC message either way; chunks are at most 1 MiB, so this is headroom.
    max_message_bytes: int = 8 * 1024 * 1024
    # Caps of every volume a service stores or reads, from its header before anything is
    # allocated (the same in every service, so nothing stored is refused when read).
    max_volume_voxels: int = DEFAULT_LIMITS.max_voxels
    max_volume_bytes: int = DEFAULT_LIMITS.max_bytes
    # RPCs one server runs at once (open streams included); more are refused RESOURCE_EXHAUSTED
    # at once instead of queueing without bound (grpc's maximum_concurrent_rpcs).
    max_concurrent_rpcs: int = 1000
    # Auth (services.common.auth). Static bearer tokens, each an admin (older deployments).
    auth_tokens: Annotated[list[str], NoDecode] = pydantic.Field(default_factory=list)
    # HS256 key of the access tokens the gateway issues to built-in users (at least 32 bytes).
    auth_signing_key: str | None = None
    # Service identities every server accepts: name=token entries (gateway, inference, ...).
    auth_services: Annotated[list[str], NoDecode] = pydantic.Field(default_factory=list)
    # The token this service sends to the datastore (its own entry of auth_services).
    auth_service_token: str | None = None
    # An OpenID Connect issuer (Keycloak, Entra ID, Okta): its tokens are accepted, checked
    # against its keys (JWKS URL or file) and, when set, the audience (client id). The claims
    # are MONAI Label's MONAI_LABEL_AUTH_TOKEN_USERNAME / _ROLES ("a#b" is a nested claim).
    auth_oidc_issuer: str | None = None
    auth_oidc_jwks: str | None = None
    auth_oidc_audience: str | None = None
    auth_oidc_username_claim: str = "preferred_username"
    auth_oidc_roles_claim: str = "realm_access#roles"

    @pydantic.model_validator(mode="after")
    def _check_oidc(self) -> Any:
        if bool(self.auth_oidc_issuer) != bool(self.auth_oidc_jwks):
            raise ValueError("auth_oidc_issuer and auth_oidc_jwks go together (the issuer and its keys)")
        return self

    @field_validator("auth_tokens", "auth_services", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        """Fail closed: a value that is given but holds no token (an empty Secret, `tokens: [""]`)
        refuses to start instead of silently turning auth off; only a real empty list is "off"."""
        items = _split_list(value)
        if not isinstance(items, list):
            return items
        kept = [item for item in items if not isinstance(item, str) or item.strip()]
        if (isinstance(value, str) or items) and not kept:
            raise ValueError("is set but empty: refusing to start with auth silently off")
        return kept

    @field_validator("auth_service_token", mode="after")
    @classmethod
    def _check_service_token(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is set but empty: refusing to start with auth silently off")
        return value

    @field_validator("auth_signing_key", mode="after")
    @classmethod
    def _check_signing_key(cls, value: str | None) -> str | None:
        return None if value is None else check_signing_key(value)

    @field_validator("auth_services", mode="after")
    @classmethod
    def _check_services(cls, value: list[str]) -> list[str]:
        parse_service_credentials(value)
        return value

    @property
    def auth_enabled(self) -> bool:
        """Auth is on when static tokens, a signing key, service credentials or an issuer are configured."""
        return bool(self.auth_tokens or self.auth_signing_key or self.auth_services or self.auth_oidc_issuer)

    @property
    def service_token(self) -> str:
        """The token this service sends to the others: its own service token, else the first
        static token (older deployments); empty with auth off."""
        if self.auth_service_token:
            return self.auth_service_token
        return self.auth_tokens[0] if self.auth_tokens else ""

    # Bounds are validators rather than Field(ge=...): a subclass that re-declares a field with
    # its own default (the datastore's `port: int = 50051`) keeps them.
    @field_validator("port", "metrics_port", mode="after")
    @classmethod
    def _check_port(cls, value: int, info: pydantic.ValidationInfo) -> int:
        lowest = -1 if info.field_name == "metrics_port" else 0
        if not lowest <= value <= 65535:
            raise ValueError(f"must be between {lowest} and 65535")
        return value

    @field_validator("grace_seconds", mode="after")
    @classmethod
    def _check_grace(cls, value: float) -> float:
        if value < 0:
            raise ValueError("must not be negative")
        return value

    @field_validator("max_concurrent_rpcs", "max_volume_voxels", "max_volume_bytes", mode="after")
    @classmethod
    def _check_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @property
    def volume_limits(self) -> VolumeLimits:
        """The volume caps these settings ask for (formats.VolumeLimits)."""
        return VolumeLimits(max_voxels=self.max_volume_voxels, max_bytes=self.max_volume_bytes)

    @field_validator("max_message_bytes", mode="after")
    @classmethod
    def _check_message_size(cls, value: int) -> int:
        if value < _MIN_MESSAGE_BYTES:
            raise ValueError(f"must be at least {_MIN_MESSAGE_BYTES} bytes (a full chunk and its envelope)")
        return value

    @field_validator("log_level", mode="after")
    @classmethod
    def _upper_level(cls, value: str) -> str:
        level = value.upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(_LOG_LEVELS)}")
        return level


def _unwrap_optional(annotation: Any) -> Any:
    """`X | None` -> X, so optional fields get the flag of X."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _add_flag(parser: argparse.ArgumentParser, name: str, field: Any) -> None:
    flag = "--" + name.replace("_", "-")
    annotation = _unwrap_optional(field.annotation)
    origin = typing.get_origin(annotation)
    default = field.get_default(call_default_factory=True)
    shown = "<hidden>" if any(word in name for word in ("secret", "token", "password")) else repr(default)
    help_text = field.description or f"(env LABELGRID_{name.upper()}; default: {shown})"
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
    if annotation is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif origin is Literal:
        choices = typing.get_args(annotation)
        parser.add_argument(
            flag, choices=choices, type=type(choices[0]), metavar="{" + ",".join(map(str, choices)) + "}", **kwargs
        )
    elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        parser.add_argument(flag, choices=[member.value for member in annotation], **kwargs)
    elif origin in (list, tuple, set, frozenset):
        # Repeatable, and each value may be a comma list: --bundle a --bundle b,c -> [a, b, c].
        parser.add_argument(flag, type=_split_list, metavar="A,B", action="extend", **kwargs)
    elif annotation in (int, float):
        parser.add_argument(flag, type=annotation, **kwargs)
    elif annotation is Path:
        parser.add_argument(flag, type=Path, metavar="PATH", **kwargs)
    else:
        # str and anything else pydantic can coerce from a string.
        parser.add_argument(flag, type=str, **kwargs)


def build_parser(cls: type[ServiceSettings], description: str = "") -> argparse.ArgumentParser:
    """One flag per settings field, named after it."""
    parser = argparse.ArgumentParser(description=description)
    for name, field in cls.model_fields.items():
        _add_flag(parser, name, field)
    return parser


def parse_settings(cls: type[SettingsT], argv: list[str] | None = None, description: str = "") -> SettingsT:
    """Settings from env vars and `argv` (None = sys.argv[1:]); flags override env vars.

    Invalid values exit with a usage message, like any argparse error.
    """
    parser = build_parser(cls, description)
    flags = vars(parser.parse_args(argv))
    try:
        # Init kwargs take precedence over env vars in pydantic-settings.
        return cls(**flags)
    except pydantic.ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in err.errors())
        parser.error(problems)
        raise  # unreachable: parser.error exits
