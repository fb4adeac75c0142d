"""MONAI Label 0.8.5's ``datastore_v2.json`` in a studies folder: read, write, mirror.

The index is the source of truth; this file is kept so that an existing MONAI Label
studies folder opens as it is, and so that a MONAI Label server (or tool) pointed at the
same folder keeps working. MONAI Label guards every read and write of the file with
``filelock.FileLock(<studies>/.lock)``; we take the same lock and, unlike MONAI Label,
write a temporary file and ``os.replace`` it, so no reader ever sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import filelock

from services.common.errors import StorageError

_log = logging.getLogger(__name__)

DATASTORE_FILE = "datastore_v2.json"
LOCK_FILE = ".lock"
DEFAULT_NAME = "new-dataset"
DEFAULT_DESCRIPTION = "New Dataset"
DEFAULT_LOCK_TIMEOUT_S = 30.0


def empty_model(name: str = DEFAULT_NAME, description: str = DEFAULT_DESCRIPTION) -> dict[str, Any]:
    """The model MONAI Label writes for a fresh studies folder."""
    return {"name": name, "description": description, "images_dir": ".", "labels_dir": "labels", "objects": {}}


def _lock(root: Path, timeout: float) -> filelock.BaseFileLock:
    # thread_local=False: the mirror thread and request threads share one process-wide view.
    return filelock.FileLock(str(root / LOCK_FILE), timeout=timeout, thread_local=False)


def _data_model(value: Any, where: str) -> dict[str, Any] | None:
    """MONAI Label's DataModel {ext: str = "", info: dict = {}}; None if unusable."""
    if not isinstance(value, Mapping):
        _log.warning("%s: ignoring %s: not an object", DATASTORE_FILE, where)
        return None
    ext = value.get("ext", "")
    info = value.get("info", {})
    if not isinstance(ext, str) or not isinstance(info, Mapping):
        _log.warning("%s: ignoring %s: ext must be a string and info an object", DATASTORE_FILE, where)
        return None
    return {"ext": ext, "info": dict(info)}


def normalize_model(data: Any) -> dict[str, Any] | None:
    """Coerces a parsed file into the exact schema, dropping (and logging) broken entries.

    Tolerant like MONAI Label's pydantic model: missing top-level keys take MONAI Label's
    defaults, unknown keys (``base_path`` …) are dropped, one broken object does not
    cost the others.
    """
    if not isinstance(data, Mapping):
        _log.warning("%s: ignoring the file: the top level is not an object", DATASTORE_FILE)
        return None
    name, description = data.get("name"), data.get("description")
    model = empty_model(
        name=name if isinstance(name, str) else DEFAULT_NAME,
        description=description if isinstance(description, str) else DEFAULT_DESCRIPTION,
    )
    for key in ("images_dir", "labels_dir"):
        if isinstance(data.get(key), str):
            model[key] = data[key]
    objects = data.get("objects", {})
    if not isinstance(objects, Mapping):
        _log.warning("%s: ignoring 'objects': not an object", DATASTORE_FILE)
        objects = {}
    for image_id, obj in objects.items():
        if not isinstance(obj, Mapping):
            _log.warning("%s: ignoring object %r: not an object", DATASTORE_FILE, image_id)
            continue
        image = _data_model(obj.get("image"), f"image of {image_id!r}")
        if image is None:
            continue
        labels: dict[str, Any] = {}
        raw_labels = obj.get("labels", {})
        if isinstance(raw_labels, Mapping):
            for tag, lab in raw_labels.items():
                parsed = _data_model(lab, f"label {tag!r} of {image_id!r}")
                if parsed is not None:
                    labels[str(tag)] = parsed
        else:
            _log.warning("%s: ignoring labels of %r: not an object", DATASTORE_FILE, image_id)
        model["objects"][str(image_id)] = {"image": image, "labels": labels}
    return model


def read_monailabel_json(
    root: str | os.PathLike[str], *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S
) -> dict[str, Any] | None:
    """The folder's datastore model, normalised; None if there is no file or it is not valid JSON."""
    root = Path(root)
    path = root / DATASTORE_FILE
    if not path.is_file():
        return None
    try:
        with _lock(root, lock_timeout):
            raw = path.read_bytes()
    except filelock.Timeout as e:
        raise StorageError(f"timed out waiting for {root / LOCK_FILE} to read {path}") from e
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e}") from e
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        _log.warning("ignoring %s: it is not valid JSON (%s)", path, e)
        return None
    return normalize_model(data)


def write_monailabel_json(
    root: str | os.PathLike[str], model: Mapping[str, Any] | bytes, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S
) -> None:
    """Atomically replaces the folder's ``datastore_v2.json`` under MONAI Label's lock.

    Serialised before taking the lock (MONAI Label readers wait only for the write): a
    model as MONAI Label writes it (indent 2), bytes (the model already serialised, e.g.
    ``SqlIndex.export_monailabel_json``) as they are; fsynced, then ``os.replace``d.
    """
    root = Path(root)
    path = root / DATASTORE_FILE
    payload = model if isinstance(model, bytes) else json.dumps(model, indent=2, default=str).encode()
    try:
        with _lock(root, lock_timeout):
            fd, tmp = tempfile.mkstemp(prefix=f".{DATASTORE_FILE}.", suffix=".tmp", dir=root)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except filelock.Timeout as e:
        raise StorageError(f"timed out waiting for {root / LOCK_FILE} to write {path}") from e
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e}") from e


class JsonMirror:
    """Keeps ``datastore_v2.json`` following the index, at most one write per ``interval``.

    Call ``mark_dirty()`` after every change; a background thread rebuilds the model with
    ``export()`` (e.g. ``SqlIndex.export_monailabel_model``) and writes it, coalescing
    bursts, so 10k uploads do not rewrite a 10k-object file 10k times. The model is built
    at write time, so the last write always reflects the latest committed state.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        export: Callable[[], Mapping[str, Any] | bytes],
        *,
        interval: float = 0.5,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
    ) -> None:
        self._root = Path(root)
        self._export = export
        self._interval = interval
        self._lock_timeout = lock_timeout
        self._cond = threading.Condition()
        self._dirty = False
        self._closed = False
        self._last_write = 0.0  # monotonic time of the last write
        self._write_lock = threading.Lock()  # one writer at a time: thread or flush()
        self.writes = 0  # number of files written (for tests and metrics)
        self._thread = threading.Thread(target=self._run, name="datastore-json-mirror", daemon=True)
        self._thread.start()

    def mark_dirty(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._dirty = True
            self._cond.notify()

    def flush(self) -> None:
        """Writes now, synchronously (errors propagate as StorageError)."""
        with self._cond:
            self._dirty = False
        self._write()

    def close(self) -> None:
        """Stops the thread, then writes once more if anything changed since the last write."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        self._thread.join()
        with self._cond:
            dirty, self._dirty = self._dirty, False
        if dirty:
            self._write()

    def __enter__(self) -> JsonMirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self) -> None:
        with self._write_lock:
            write_monailabel_json(self._root, self._export(), lock_timeout=self._lock_timeout)
            self._last_write = time.monotonic()
            self.writes += 1

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                # Coalesce: let changes pile up until `interval` after the previous write.
                while not self._closed:
                    wait = self._last_write + self._interval - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._closed:
                    return  # close() writes what is pending
                self._dirty = False
            try:
                self._write()
            except Exception:  # noqa: BLE001 - keep mirroring; the next change or close() tries again
                _log.exception("could not write %s", self._root / DATASTORE_FILE)
                with self._cond:
                    self._dirty = True
                    self._last_write = time.monotonic()  # back off one interval before retrying
