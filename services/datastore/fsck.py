"""`python -m services.datastore fsck [--repair]`: is the index consistent with the blobs?

Checks, for the local and S3 backends on SQLite or PostgreSQL:

- index rows (images, labels, model versions) whose blob is gone (``missing-blob``);
- blobs no index row knows (``unindexed-blob``: a process killed between storing the
  bytes and writing the row, or files copied in by hand);
- blobs whose size differs from the index (``size-mismatch``), and with ``checksums``
  every blob's bytes hashed against the index's sha256 (``checksum-mismatch``);
- half-written spools and temp files a killed datastore left (``half-written-spool``),
  MONAI Label mirror temp files (local), orphan S3 multipart uploads (``orphan-multipart``);
- expired leases still in the index (``stale-lease``);
- old bytes an image or label replacement kept aside under ``replaced/<write>/<key>`` and a killed
  datastore left there (``replaced-blob``).

Spools and multipart uploads younger than ``min_age_seconds`` may be a live server's
upload in flight: they are counted, not reported (pass 0 when no server runs).

``repair`` fixes what is safe: removes old spools and temp files, aborts old multipart
uploads, drops expired leases, settles kept-aside replacements (see `_settle_replaced`: the
old bytes go back only where the index row still describes them), then re-indexes (the same rebuild as ``reindex``: adoptable
blobs are indexed, rows whose blob is gone dropped, changed sizes re-hashed) and drops model
versions whose blob is gone. A checksum mismatch of the same size is reported, never
"repaired": which side is right needs a person. After a repair the store is checked again,
and what is left is the report.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.errors import NotFound
from services.datastore.adapters.blobs import (
    STALE_SPOOL_SECONDS,
    LocalBlobStore,
    S3BlobStore,
)
from services.datastore.domain.datastore import (
    Datastore,
    image_key,
    label_key,
    model_key,
)
from services.datastore.domain.ports import REPLACED_AREA, replaced_original_key
from services.datastore.domain.reindex import _all_images, _all_model_versions

Now = Callable[[], float]


@dataclass(frozen=True)
class Problem:
    kind: str
    subject: str
    detail: str

    def line(self) -> str:
        return f"{self.kind}: {self.subject}: {self.detail}"


@dataclass
class FsckReport:
    problems: list[Problem] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0  # spools / multipart uploads younger than min_age (not problems)

    @property
    def clean(self) -> bool:
        return not self.problems

    def lines(self) -> Iterator[str]:
        for repair in self.repairs:
            yield f"repaired: {repair}"
        for problem in self.problems:
            yield problem.line()
        counts = ", ".join(f"{n} {what}" for what, n in self.checked.items())
        tail = f"; {self.in_flight} uploads in flight skipped" if self.in_flight else ""
        verdict = "clean" if self.clean else f"{len(self.problems)} problems"
        yield f"fsck: {verdict} (checked {counts}{tail})"


# -- finding ---------------------------------------------------------------------------


def _hash(blobs: Any, key: str) -> str:
    digest = hashlib.sha256()
    stream = blobs.open_read(key, 0, None)
    try:
        for chunk in stream:
            digest.update(chunk)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return digest.hexdigest()


def _indexed(index: Any) -> dict[str, tuple[int, str]]:
    """Every blob key the index knows -> (size, sha256)."""
    known: dict[str, tuple[int, str]] = {}
    for image in _all_images(index):
        known[image_key(f"{image.image_id}{image.ext}")] = (image.size, image.sha256)
        for tag, label in image.labels.items():
            known[label_key(tag, f"{image.image_id}{label.ext}")] = (
                label.size,
                label.sha256,
            )
    for model, version in sorted(_all_model_versions(index)):
        record = index.get_model_version(model, version)
        known[model_key(model, version, record.file_name)] = (
            record.size,
            record.sha256,
        )
    return known


def _spool_leftovers(datastore: Datastore) -> list[Path]:
    """Files in the spool folder, plus the JSON mirror's temp files in a local studies folder."""
    found: list[Path] = []
    spool = Path(datastore.blobs.spool_dir())
    if spool.is_dir():
        found.extend(sorted(spool.iterdir()))
    if isinstance(datastore.blobs, LocalBlobStore):
        found.extend(sorted(datastore.blobs.root.glob(".datastore_v2.json.*.tmp")))
    return found


def _multipart_uploads(blobs: S3BlobStore) -> Iterator[Any]:
    """Unfinished multipart uploads under the store's prefix (minio has no public call for this)."""
    client = blobs._client
    key_marker: str | None = None
    while True:
        result = client._list_multipart_uploads(
            blobs.bucket,
            prefix=blobs.prefix or None,
            key_marker=key_marker,
            max_uploads=1000,
        )
        yield from result.uploads
        if not result.is_truncated or not result.next_key_marker or result.next_key_marker == key_marker:
            return
        key_marker = result.next_key_marker


def _age(upload_time: Any, now: float) -> float:
    stamp = upload_time.timestamp() if upload_time is not None else 0.0
    return now - stamp


def check(
    datastore: Datastore,
    *,
    checksums: bool = False,
    min_age_seconds: float = STALE_SPOOL_SECONDS,
    now: Now = time.time,
) -> FsckReport:
    """Finds problems without changing anything."""
    if datastore.mirror is not None:
        # Stop this process's own datastore_v2.json writer (it writes what is pending first):
        # its temp file must not show up as a leftover while we look.
        datastore.mirror.close()
    report = FsckReport()
    blobs, index = datastore.blobs, datastore.index
    known = _indexed(index)
    stored = {info.key: info for area in ("images/", "labels/", "models/") for info in blobs.list(area)}
    report.checked = {"index rows": len(known), "blobs": len(stored)}

    for key, (size, sha) in sorted(known.items()):
        info = stored.get(key)
        if info is None:
            report.problems.append(Problem("missing-blob", key, "the index has a row, the store has no bytes"))
        elif info.size != size:
            report.problems.append(
                Problem(
                    "size-mismatch",
                    key,
                    f"index says {size} bytes, the store holds {info.size}",
                )
            )
        elif checksums:
            actual = _hash(blobs, key)
            if actual != sha:
                report.problems.append(
                    Problem(
                        "checksum-mismatch",
                        key,
                        f"index sha256 {sha}, the bytes hash to {actual}",
                    )
                )
    for key in sorted(set(stored) - set(known)):
        report.problems.append(Problem("unindexed-blob", key, f"{stored[key].size} bytes no index row knows"))

    for info in blobs.list(f"{REPLACED_AREA}/"):
        report.problems.append(
            Problem("replaced-blob", info.key, f"{info.size} bytes kept aside by a replacement that did not finish")
        )

    t = now()
    for path in _spool_leftovers(datastore):
        try:
            age = t - path.lstat().st_mtime
            size = path.lstat().st_size
        except OSError:
            continue  # finished or removed while we looked
        if age < min_age_seconds:
            report.in_flight += 1
            continue
        report.problems.append(
            Problem(
                "half-written-spool",
                str(path),
                f"{size} bytes, untouched for {age:.0f} s",
            )
        )

    if isinstance(blobs, S3BlobStore):
        for upload in _multipart_uploads(blobs):
            if _age(upload.initiated_time, t) < min_age_seconds:
                report.in_flight += 1
                continue
            report.problems.append(
                Problem(
                    "orphan-multipart",
                    upload.object_name,
                    f"upload {upload.upload_id} started {upload.initiated_time}",
                )
            )

    stale = [lease for lease in _all_leases(index) if lease.expire_time.timestamp() <= t]
    for lease in stale:
        report.problems.append(
            Problem(
                "stale-lease",
                lease.image_id,
                f"client {lease.client_id!r}, expired {lease.expire_time.isoformat()}",
            )
        )
    return report


def _settle_replaced(blobs: Any, kept: str, known: dict[str, tuple[int, str]]) -> str:
    """One ``replaced/<write>/<key>`` left by a datastore killed while it replaced `key`.

    The index row is the commit point of a replacement (Datastore._store_blob): the old bytes
    were copied aside, the new stored under `key`, then the row written. So if the row still
    describes the kept bytes (its sha256) and `key` holds something else, the datastore died
    before the row: the new bytes were never committed and the old go back. In every other
    case (the row names the new bytes, or nothing was replaced yet, or the row is gone) the
    kept copy is stale and is deleted.
    """
    key = replaced_original_key(kept)
    row = known.get(key)
    if row is not None and _hash(blobs, kept) == row[1]:
        try:
            current = _hash(blobs, key)
        except NotFound:
            current = None
        if current != row[1]:
            blobs.move(kept, key)
            return f"restored {key} from {kept} (the index row still describes those bytes)"
    blobs.delete(kept)
    return f"removed {kept} (the index row describes the bytes under {key})"


def _all_leases(index: Any) -> Iterator[Any]:
    """Every lease row, live or expired (list_leases shows those live at `now`: ask as of the epoch)."""
    token = ""
    while True:
        page = index.list_leases(None, page_size=1000, page_token=token, now=0.0)
        yield from page.items
        token = page.next_page_token
        if not token:
            return


# -- repairing -------------------------------------------------------------------------


def repair(
    datastore: Datastore,
    *,
    checksums: bool = False,
    min_age_seconds: float = STALE_SPOOL_SECONDS,
    now: Now = time.time,
) -> FsckReport:
    """Fixes what is safe to fix (see the module docstring); the report is the check that follows."""
    before = check(datastore, checksums=False, min_age_seconds=min_age_seconds, now=now)
    done: list[str] = []
    replaced = [p.subject for p in before.problems if p.kind == "replaced-blob"]
    if replaced:
        # First: a kept-aside image must be back before the reindex re-hashes what it finds.
        known = _indexed(datastore.index)
        done.extend(_settle_replaced(datastore.blobs, key, known) for key in replaced)
        before = check(datastore, checksums=False, min_age_seconds=min_age_seconds, now=now)
    kinds = {p.kind for p in before.problems}
    for problem in before.problems:
        if problem.kind == "half-written-spool":
            Path(problem.subject).unlink(missing_ok=True)
            done.append(f"removed {problem.subject}")
        elif problem.kind == "orphan-multipart":
            upload_id = problem.detail.split()[1]
            blobs: Any = datastore.blobs
            blobs._client._abort_multipart_upload(blobs.bucket, problem.subject, upload_id)
            done.append(f"aborted multipart upload {upload_id} of {problem.subject}")
    if "stale-lease" in kinds:
        expired = datastore.index.expire_leases(now=now())
        done.append(f"dropped {expired} expired leases")
    if kinds & {"missing-blob", "unindexed-blob", "size-mismatch"}:
        missing_models = [
            p.subject for p in before.problems if p.kind == "missing-blob" and p.subject.startswith("models/")
        ]
        counts = datastore.reindex()
        done.append(
            f"re-indexed from the blobs: {counts.images} images, {counts.labels} labels, "
            f"{counts.model_versions} model versions, {counts.removed} rows without blobs dropped"
        )
        for key in missing_models:
            _, model, version, _ = key.split("/", 3)
            datastore.index.delete_model_version(model, version)
            done.append(f"dropped model version {model}/{version} (its blob is gone)")
    if datastore.mirror is not None:
        datastore.mirror.flush()  # MONAI Label's datastore_v2.json follows the repaired index
    after = check(datastore, checksums=checksums, min_age_seconds=min_age_seconds, now=now)
    after.repairs = done
    return after
