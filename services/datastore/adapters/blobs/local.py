"""The local blob store: MONAI Label's own studies-folder layout, so an existing folder is
adopted as is and MONAI Label can still open it afterwards."""

from __future__ import annotations

import builtins
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from services.common.errors import InvalidArgument, NotFound, StorageError
from services.datastore.adapters.blobs.shared import (
    _RESERVED_ROOT_NAMES,
    CHUNK_SIZE,
    MONAILABEL_IMAGE_EXTS,
    STALE_SPOOL_SECONDS,
    _check_expiry,
    _check_range,
    _check_sha256,
    _ChunkStream,
    _discard,
    _file_mode,
    _fsync_dir,
    _remove_stale,
    _split_key,
)
from services.datastore.domain.ports import REPLACED_AREA, BlobInfo


class LocalBlobStore:
    """Objects as files in a MONAI Label studies folder.

    ``images/<f>`` is ``<root>/<f>``; ``labels/<tag>/<f>`` is ``<root>/labels/<tag>/<f>``;
    ``models/...`` live in ``<root>/.labelgrid/models/...``, ``sessions/<f>`` in
    ``<root>/.labelgrid/sessions/<f>`` and spool files in ``<root>/.labelgrid/tmp`` (same
    filesystem, so `put_file` is a rename).
    """

    def __init__(self, root: Path, *, stale_spool_seconds: float = STALE_SPOOL_SECONDS):
        self.root = Path(root).resolve()
        self._mode = _file_mode()
        self._state = self.root / ".labelgrid"
        self._models = self._state / "models"
        self._tmp = self._state / "tmp"
        self._sessions = self._state / "sessions"
        self._replaced = self._state / REPLACED_AREA  # outside what MONAI Label scans
        self._labels = self.root / "labels"
        self._lock = threading.Lock()  # orders mkdir/replace against empty-dir pruning
        try:
            for directory in (self.root, self._labels / "final", self._labels / "original", self._models, self._tmp):
                directory.mkdir(parents=True, exist_ok=True)
            _remove_stale(self._tmp, stale_spool_seconds)
        except OSError as exc:
            raise StorageError(f"cannot prepare the studies folder {self.root}: {exc}") from exc

    # keys <-> paths

    def _path(self, key: str) -> Path:
        parts = _split_key(key)
        if parts[0] == "images":
            name = parts[1]
            if name in _RESERVED_ROOT_NAMES:
                raise InvalidArgument(f"blob key {key!r} names a reserved file of the studies folder")
            path = self.root / name
        elif parts[0] == "labels":
            path = self._labels / parts[1] / parts[2]
        elif parts[0] == "sessions":
            path = self._sessions / parts[1]
        elif parts[0] == REPLACED_AREA:
            path = self._replaced.joinpath(*parts[1:])
        else:
            path = self._models.joinpath(*parts[1:])
        # Defense in depth: a symlinked folder must not lead outside the root either. The file
        # itself may be a symlink (adopted folders often link images in); the link is the object.
        resolved = path.parent.resolve() / path.name
        if not resolved.is_relative_to(self.root):
            raise InvalidArgument(f"blob key {key!r} resolves outside the studies folder")
        return path

    def _key_for(self, path: Path) -> str | None:
        """The key of a file found on disk, or None when it is not an object (or not one we could address)."""
        key = self._layout_key(path)
        if key is None:
            return None
        try:
            _split_key(key)
        except InvalidArgument:
            return None  # e.g. a backslash in a file name: listed, it would fail every other call
        return key

    def _layout_key(self, path: Path) -> str | None:
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return None
        parts = rel.parts
        if any(p.startswith(".") for p in parts[:1]) and parts[0] != ".labelgrid":
            return None
        if len(parts) == 1:
            name = parts[0]
            if name.startswith(".") or name in _RESERVED_ROOT_NAMES or not name.endswith(MONAILABEL_IMAGE_EXTS):
                return None
            return f"images/{name}"
        if parts[0] == "labels" and len(parts) == 3 and not parts[1].startswith(".") and not parts[2].startswith("."):
            return f"labels/{parts[1]}/{parts[2]}"
        if parts[:2] == (".labelgrid", "models") and len(parts) >= 5:
            if any(p.startswith(".") for p in parts[2:]):
                return None
            return "models/" + "/".join(parts[2:])
        if parts[:2] == (".labelgrid", REPLACED_AREA) and len(parts) >= 4:
            if any(p.startswith(".") for p in parts[2:]):
                return None
            return f"{REPLACED_AREA}/" + "/".join(parts[2:])
        if parts[:2] == (".labelgrid", "sessions") and len(parts) == 3 and not parts[2].startswith("."):
            return f"sessions/{parts[2]}"
        return None

    # writes

    def put_file(self, key: str, path: Path, *, sha256: str, content_type: str = "application/octet-stream") -> None:
        """fsync, then rename over the old object, then fsync the folder; `path` is consumed."""
        source = Path(path)
        staged: Path | None = None
        try:
            target = self._path(key)
            _check_sha256(sha256)
            if not source.is_file():
                raise StorageError(f"cannot store {key!r}: the source {source} is not a file")
            if source.stat().st_dev != self._tmp.stat().st_dev:
                # Another filesystem: copy next to the target first, so the final step is still a rename.
                fd, name = tempfile.mkstemp(prefix="put-", suffix=".part", dir=self._tmp)
                staged = Path(name)
                with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                    shutil.copyfileobj(src, out, CHUNK_SIZE)
                source.unlink(missing_ok=True)
                source = staged
            fd = os.open(source, os.O_RDONLY)
            try:
                os.fchmod(fd, self._mode)  # spools are 0o600; MONAI Label (maybe another user) reads these
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._lock:
                created = not target.parent.exists()
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
                _fsync_dir(target.parent)
                if created:
                    _fsync_dir(target.parent.parent)
        except (InvalidArgument, StorageError):
            raise
        except OSError as exc:
            raise StorageError(f"cannot store {key!r}: {exc}") from exc
        finally:
            _discard(Path(path))
            if staged is not None:
                _discard(staged)

    def copy(self, source_key: str, target_key: str) -> None:
        """`target_key` becomes a copy of `source_key` (NotFound without one): a hard link where
        it can (no bytes copied; replacing the source later renames a new file over its name, so
        the link keeps the old bytes), a copied symlink for a linked file, else a byte copy."""
        source, target = self._path(source_key), self._path(target_key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".copy-", suffix=".part", dir=target.parent)
            os.close(fd)
            staged = Path(name)
            try:
                staged.unlink()
                if source.is_symlink():
                    os.symlink(os.readlink(source), staged)
                else:
                    try:
                        os.link(source, staged)
                    except FileNotFoundError:
                        raise
                    except OSError:  # another filesystem, or links not allowed
                        shutil.copyfile(source, staged)
                with self._lock:
                    os.replace(staged, target)
                    _fsync_dir(target.parent)
            finally:
                staged.unlink(missing_ok=True)
        except FileNotFoundError:
            raise NotFound(f"object {source_key!r} not found", reason="NOT_FOUND") from None
        except OSError as exc:
            raise StorageError(f"cannot copy {source_key!r} to {target_key!r}: {exc}") from exc

    def move(self, source_key: str, target_key: str) -> None:
        """Renames `source_key` over `target_key` (atomic: the target is old or new, never gone)."""
        source, target = self._path(source_key), self._path(target_key)
        try:
            with self._lock:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
                _fsync_dir(target.parent)
                self._prune(source.parent)
        except FileNotFoundError:
            raise NotFound(f"object {source_key!r} not found", reason="NOT_FOUND") from None
        except OSError as exc:
            raise StorageError(f"cannot move {source_key!r} to {target_key!r}: {exc}") from exc

    def delete(self, key: str) -> bool:
        path = self._path(key)
        with self._lock:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            except IsADirectoryError:
                return False
            except OSError as exc:
                raise StorageError(f"cannot delete {key!r}: {exc}") from exc
            self._prune(path.parent)
        return True

    def _prune(self, directory: Path) -> None:
        """Removes empty model version/name and kept-aside write folders; label and root folders
        stay (MONAI Label expects them)."""
        for area in (self._models, self._replaced):
            if directory.is_relative_to(area):
                while directory != area:
                    try:
                        directory.rmdir()
                    except OSError:
                        return
                    directory = directory.parent

    def delete_prefix(self, prefix: str) -> int:
        """Deletes every object under `prefix`; an empty prefix is refused."""
        if not prefix:
            raise InvalidArgument("delete_prefix needs a prefix: refusing to delete the whole store")
        count = 0
        for info in list(self.list(prefix)):
            if self.delete(info.key):
                count += 1
        return count

    # reads

    def stat(self, key: str) -> BlobInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise NotFound(f"object {key!r} not found", reason="NOT_FOUND") from None
        except OSError as exc:
            raise StorageError(f"cannot stat {key!r}: {exc}") from exc
        if not path.is_file():
            raise NotFound(f"object {key!r} not found", reason="NOT_FOUND")
        return BlobInfo(key, st.st_size, None, st.st_mtime)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        _check_range(offset, length)
        path = self._path(key)
        try:
            stream: BinaryIO = open(path, "rb")  # noqa: SIM115 - the returned _ChunkStream closes it
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"object {key!r} not found", reason="NOT_FOUND") from None
        except OSError as exc:
            raise StorageError(f"cannot open {key!r}: {exc}") from exc
        if offset:
            stream.seek(offset)
        return _ChunkStream(stream.read, stream.close, length)

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        """Sorted by key; only files MONAI Label would see as images are listed under images/."""
        found: list[BlobInfo] = []
        for directory, recursive in self._dirs_for(prefix):
            for path in self._walk(directory, recursive):
                key = self._key_for(path)
                if key is None or not key.startswith(prefix):
                    continue
                try:
                    st = path.stat()
                except OSError:
                    continue  # deleted while listing
                found.append(BlobInfo(key, st.st_size, None, st.st_mtime))
        found.sort(key=lambda info: info.key)
        return iter(found)

    def _dirs_for(self, prefix: str) -> builtins.list[tuple[Path, bool]]:
        areas = [("images/", self.root, False), ("labels/", self._labels, True), ("models/", self._models, True)]
        areas.append(("sessions/", self._sessions, False))
        areas.append((f"{REPLACED_AREA}/", self._replaced, True))
        dirs: list[tuple[Path, bool]] = []
        for area, directory, recursive in areas:
            if area.startswith(prefix):
                dirs.append((directory, recursive))
            elif prefix.startswith(area):
                # Narrow the walk to the deepest folder the prefix names.
                sub = prefix[len(area) :].rsplit("/", 1)[0] if "/" in prefix[len(area) :] else ""
                parts = [p for p in sub.split("/") if p]
                if any(p in (".", "..") for p in parts):
                    return []
                dirs.append((directory.joinpath(*parts), recursive))
        return dirs

    @staticmethod
    def _walk(directory: Path, recursive: bool) -> Iterator[Path]:
        if not directory.is_dir():
            return
        if not recursive:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=True):
                        yield Path(entry.path)
            return
        for dirpath, dirnames, filenames in os.walk(directory):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                yield Path(dirpath) / name

    def presigned_get_url(self, key: str, expires_seconds: int) -> str:
        """A file:// URL: local files need no signature, and the path is what MONAI Label uses."""
        _check_expiry(expires_seconds)
        return self._path(key).absolute().as_uri()

    spools_become_blobs = True
    """`put_file` renames a spool into place (same filesystem), so the datastore's spools are
    written back to disk while they arrive (SpoolWriter's `writeback`): put_file's one fsync
    then waits for the last part only."""

    def spool_dir(self) -> Path:
        self._tmp.mkdir(parents=True, exist_ok=True)
        return self._tmp

    def close(self) -> None:
        """Nothing to release; here so both stores can be closed alike."""
