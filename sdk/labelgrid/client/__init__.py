"""labelgrid's Python SDK: typed calls on the gRPC services, with no raw chunks in sight.

    from labelgrid.client import Client

    with Client("127.0.0.1:8000", token="...") as lg:      # Envoy's port, or a service's
        [m.model_id for m in lg.list_models()]
        image = lg.upload_image("scan.nii.gz")              # chunked, sha256-checked
        result = lg.infer("segmentation", image.image_id, "scan_seg.nii.gz")
        lg.download_label(image.image_id, "final", "final.nii.gz")
        lg.next_sample("annotator-1")                       # None when nothing is left
        lg.next_sample_result("annotator-1")                # or NoSample(reason="ALL_LEASED")

Uploads stream the file in chunks of at most 1 MiB and end with its sha256, which the server
verifies; downloads are written to a temporary file, verified against the sha256 the server
sends first, and only then moved into place. Every call carries a deadline and, when a token is
given, `authorization: Bearer <token>`. A call that fails with UNAVAILABLE (the service is
restarting, a connection dropped) is retried with exponential backoff and jitter — an
inference only while no answer has arrived yet. Failures raise `LabelgridError` (with the
gRPC code and labelgrid's error reason) or one of its subclasses.

This package is hand-written (sdk/labelgrid/client in the repository) and installed into the
`labelgrid` package next to the generated code (protos/gen/python/labelgrid).
"""

from labelgrid.client._client import (
    DEFAULT_TARGET,
    Client,
    InferResult,
    NoSample,
    Sample,
    Transfer,
)
from labelgrid.client._errors import (
    ChecksumMismatch,
    LabelgridError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "DEFAULT_TARGET",
    "ChecksumMismatch",
    "Client",
    "InferResult",
    "LabelgridError",
    "NoSample",
    "NotFound",
    "PermissionDenied",
    "Sample",
    "Transfer",
    "Unauthenticated",
    "Unavailable",
]
