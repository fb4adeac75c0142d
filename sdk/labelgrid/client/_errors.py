"""The SDK's exceptions: one base class, a few subclasses worth catching on their own."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class LabelgridError(Exception):
    """A call failed. `code` is the gRPC status code (None for a local failure such as a
    checksum mismatch), `reason` labelgrid's error reason (e.g. "IMAGE_NOT_FOUND") when the
    server sent one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.message, self.code, self.reason = message, code, reason

    def __str__(self) -> str:
        where = f"{self.code.name}" if self.code is not None else ""
        if self.reason and self.reason != where:
            where = f"{where} {self.reason}".strip()
        return f"{self.message} ({where})" if where else self.message


class NotFound(LabelgridError):
    """The image, label, model or strategy does not exist."""


class Unauthenticated(LabelgridError):
    """The call carried no valid bearer token."""


class PermissionDenied(LabelgridError):
    """The token is valid but not allowed to do this."""


class Unavailable(LabelgridError):
    """The service could not be reached, even after the retries."""


class ChecksumMismatch(LabelgridError):
    """What arrived does not match the sha256 the sender announced (nothing was kept)."""


_BY_CODE: dict[grpc.StatusCode, type[LabelgridError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def from_rpc_error(err: grpc.RpcError) -> LabelgridError:
    """The SDK's exception for a failed call, with the server's ErrorInfo reason if any."""
    code: grpc.StatusCode = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else "") or code.name.lower().replace("_", " ")
    reason = ""
    try:
        status = rpc_status.from_call(err)
    except (ValueError, AttributeError):
        status = None
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
                reason = info.reason
                break
    if reason == "CHECKSUM_MISMATCH":
        return ChecksumMismatch(message, code, reason)
    return _BY_CODE.get(code, LabelgridError)(message, code, reason)
