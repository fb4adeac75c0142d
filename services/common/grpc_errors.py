"""The one mapping from domain errors to gRPC statuses, and back for clients.

Servers: `to_status(err)` gives the `grpc.Status` to abort with; it carries a
`google.rpc.Status` whose `google.rpc.ErrorInfo` detail holds the error's reason (MONAI
Label's error code), domain and metadata. Clients and the gateway: `error_details(e)`
decodes it again, and `HTTP_STATUS_FOR_CODE` is the HTTP status the gateway answers
with, per google/rpc/code.proto. No other table exists, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.errors import ErrorKind, LabelgridError

DEFAULT_DOMAIN = "labelgrid"

MAX_MESSAGE_CHARS = 1024
"""Longest message (and ErrorInfo metadata value) sent: both travel in the trailers, twice for the
message, and a client refuses trailers over its metadata limit (8-16 KiB by default) with
RESOURCE_EXHAUSTED, which would hide the real error."""

GRPC_CODE_FOR_KIND: Mapping[ErrorKind, grpc.StatusCode] = MappingProxyType(
    {kind: grpc.StatusCode[kind.value] for kind in ErrorKind}
)
"""ErrorKind -> grpc.StatusCode; the kinds are named after the codes, so the map is 1:1."""

HTTP_STATUS_FOR_CODE: Mapping[grpc.StatusCode, int] = MappingProxyType(
    {
        grpc.StatusCode.OK: 200,
        grpc.StatusCode.CANCELLED: 499,
        grpc.StatusCode.UNKNOWN: 500,
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.ALREADY_EXISTS: 409,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.FAILED_PRECONDITION: 400,
        grpc.StatusCode.ABORTED: 409,
        grpc.StatusCode.OUT_OF_RANGE: 400,
        grpc.StatusCode.UNIMPLEMENTED: 501,
        grpc.StatusCode.INTERNAL: 500,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DATA_LOSS: 500,
    }
)
"""grpc.StatusCode -> HTTP status, as google/rpc/code.proto documents for each code."""


def grpc_code(err: LabelgridError) -> grpc.StatusCode:
    return GRPC_CODE_FOR_KIND[err.kind]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "\u2026"


def rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    *,
    domain: str = DEFAULT_DOMAIN,
    metadata: Mapping[str, str] | None = None,
) -> grpc.Status:
    """A non-OK `grpc.Status` with an ErrorInfo detail, for errors that are not domain errors."""
    message = _clip(message)
    info = error_details_pb2.ErrorInfo(
        reason=reason, domain=domain, metadata={key: _clip(str(value)) for key, value in (metadata or {}).items()}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return rpc_status.to_status(status)


def to_status(err: LabelgridError, domain: str = DEFAULT_DOMAIN) -> grpc.Status:
    """The status a server aborts with for a domain error; the message goes to the client as is (clipped)."""
    return rich_status(grpc_code(err), err.message, err.reason, domain=domain, metadata=err.metadata)


@dataclass(frozen=True)
class ErrorDetails:
    """What a client needs from a failed call: the code, MONAI Label's reason, message, metadata."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)
    domain: str = ""

    @property
    def http_status(self) -> int:
        return HTTP_STATUS_FOR_CODE.get(self.code, 500)


def error_details(rpc_error: grpc.RpcError) -> ErrorDetails:
    """Decodes a failed call (sync or aio); without an ErrorInfo the reason is the code's name."""
    code = rpc_error.code() if hasattr(rpc_error, "code") else grpc.StatusCode.UNKNOWN
    message = (rpc_error.details() if hasattr(rpc_error, "details") else None) or ""
    try:
        status = rpc_status.from_call(rpc_error)
    except (ValueError, TypeError, AttributeError):
        # A status proto inconsistent with the call, or no call at all: trust the call.
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return ErrorDetails(code, info.reason, status.message, dict(info.metadata), info.domain)
    return ErrorDetails(code, code.name, message)


def error_info_from_rpc_error(rpc_error: grpc.RpcError) -> tuple[grpc.StatusCode, str, str, dict[str, str]]:
    """`error_details` as a plain (code, reason, message, metadata) tuple, for the gateway."""
    details = error_details(rpc_error)
    return details.code, details.reason, details.message, details.metadata


PROMETHEUS_CODE_LABEL: Mapping[grpc.StatusCode, str] = MappingProxyType(
    {
        code: "Canceled" if code is grpc.StatusCode.CANCELLED else code.name.title().replace("_", "")
        for code in grpc.StatusCode
    }
    | {grpc.StatusCode.OK: "OK"}
)
"""grpc.StatusCode -> the `grpc_code` label as go-grpc-prometheus spells it (Go's codes.Code.String:
"OK", "NotFound", "Canceled"), so existing dashboards and alerts match."""
