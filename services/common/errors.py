"""Domain errors shared by every service.

Plain Python, no gRPC: domain code raises these, and one table in
``services.common.grpc_errors`` turns them into a gRPC status with a
``google.rpc.ErrorInfo`` detail. ``reason`` is MONAI Label's error code where MONAI
Label has one (``INVALID_INPUT``, ``INFERENCE_ERROR`` ...), else one of ours in the
same style. The one list of reasons is the ``ErrorReason`` enum in
``protos/labelgrid/common/v1/common.proto`` (names without ``ERROR_REASON_``);
``tests/unit/test_error_reasons.py`` checks every reason the code raises is in it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class ErrorKind(enum.Enum):
    """What went wrong, independent of the transport (maps 1:1 to a gRPC code)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


class LabelgridError(Exception):
    """Base of every error a client may see; the message is shown to the client as is."""

    kind: ErrorKind = ErrorKind.INTERNAL
    reason: str = "SERVER_ERROR"

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(LabelgridError):
    kind = ErrorKind.INVALID_ARGUMENT
    reason = "INVALID_INPUT"


class NotFound(LabelgridError):
    kind = ErrorKind.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(LabelgridError):
    kind = ErrorKind.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(LabelgridError):
    kind = ErrorKind.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Aborted(LabelgridError):
    """A concurrent change won (e.g. an expected revision no longer matches); retry."""

    kind = ErrorKind.ABORTED
    reason = "REVISION_MISMATCH"


class ResourceExhausted(LabelgridError):
    kind = ErrorKind.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class OutOfRange(LabelgridError):
    kind = ErrorKind.OUT_OF_RANGE
    reason = "OUT_OF_RANGE"


class Unauthenticated(LabelgridError):
    kind = ErrorKind.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(LabelgridError):
    kind = ErrorKind.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unavailable(LabelgridError):
    kind = ErrorKind.UNAVAILABLE
    reason = "UNAVAILABLE"


class Unimplemented(LabelgridError):
    kind = ErrorKind.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


class StorageError(LabelgridError):
    """The object store or the index failed; nothing partial was made visible."""

    kind = ErrorKind.UNAVAILABLE
    reason = "STORAGE_ERROR"
