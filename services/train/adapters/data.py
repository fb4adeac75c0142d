"""Labeled images from the datastore into a local cache keyed by sha256.

An image or label whose sha256 is already cached is not fetched again (a second epoch
reads local files anyway; a second job, or a job after a restart, finds them here). A
miss asks the datastore for a URL: a presigned http(s) URL (s3 backend) is read directly
from the object store with httpx, anything else falls back to the datastore's chunk
stream. Every download is verified against its sha256 before it enters the cache, and
the cache is trimmed to its byte budget, least recently used first, never taking a file that
a running job was given (jobs on other devices run side by side) or that a fetch touched
while the trim ran.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from labelgrid.datastore.v1 import datastore_service_pb2 as ds

from services.common.chunks import sha256_file
from services.common.datastore_client import DatastoreClient
from services.common.errors import InvalidArgument, LabelgridError, StorageError
from services.common.formats import check_volume

FETCH_PREFIX = "fetch-"
"""Folders of downloads in progress, inside the cache folder (a rename away from cached)."""


class DataCache:
    def __init__(self, datastore: DatastoreClient, cache_dir: Path, budget_bytes: int):
        self.datastore = datastore
        self.cache_dir = cache_dir
        self.budget_bytes = budget_bytes
        self.hits = 0
        self.misses = 0
        self.url_downloads = 0
        self.stream_downloads = 0
        self._locks: dict[str, asyncio.Lock] = {}
        # Files of the datalists handed to jobs that have not ended (release), by how many hold each.
        self._in_use: Counter[Path] = Counter()
        # Downloads a killed service left half-done: never complete, never cached.
        for leftover in cache_dir.glob(f"{FETCH_PREFIX}*") if cache_dir.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)

    def _cached_files(self) -> list[Path]:
        """Complete cached files only: <2 hex>/<sha256><ext>, never a download in progress."""
        return [p for p in self.cache_dir.glob("??/*") if p.is_file()]

    def cached_bytes(self) -> int:
        try:
            return sum(p.stat().st_size for p in self._cached_files())
        except OSError:
            return 0

    async def labeled_datalist(self, tag: str, log: Callable[[str], None]) -> list[dict[str, str]]:
        """The datalist of a job; its files stay in the cache until `release(datalist)`."""
        images = await self.datastore.list_images(filter=ds.IMAGE_FILTER_LABELED, label_tag=tag)
        hits, misses = self.hits, self.misses
        datalist: list[dict[str, str]] = []
        try:
            await self._fetch_labeled(images, tag, log, datalist)
        except BaseException:
            self.release(datalist)
            raise
        log(
            f"{len(datalist)} labeled image(s): {self.misses - misses} file(s) fetched from the datastore, "
            f"{self.hits - hits} from the local cache"
        )
        await asyncio.to_thread(self._trim, frozenset(self._in_use))
        return datalist

    def release(self, datalist: list[dict[str, str]]) -> None:
        """The job given `datalist` has ended: its files may be trimmed (unless another job holds them)."""
        self._in_use.subtract(_files(datalist))
        self._in_use = +self._in_use  # drops the files no job holds

    async def _fetch_labeled(
        self, images: Iterable[Any], tag: str, log: Callable[[str], None], datalist: list[dict[str, str]]
    ) -> None:
        for image in images:
            label = next((item for item in image.labels if item.tag == tag), None)
            if label is None:
                continue
            try:
                image_path = await self._fetch(
                    image.name,
                    image.sha256,
                    image.ext or ".nii.gz",
                    partial(self.datastore.download_image, image.image_id),
                )
                label_path = await self._fetch(
                    label.name or f"images/{image.image_id}/labels/{tag}", label.sha256, label.ext or ".nii.gz",
                    partial(self.datastore.download_label, image.image_id, tag),
                )  # fmt: skip
            except InvalidArgument as error:  # a file the shared volume check refuses is never read
                log(f"image {image.image_id} skipped: {error.message}")
                continue
            item = {"image": str(image_path), "label": str(label_path), "image_id": image.image_id}
            datalist.append(item)
            self._in_use.update(_files([item]))  # held from now: another job's trim must not take it

    async def _fetch(self, name: str, sha256: str, ext: str, stream: Callable[[Path], Any]) -> Path:
        if not sha256:
            raise StorageError(f"the datastore gave no sha256 for {name!r}")
        target = self.cache_dir / sha256[:2] / f"{sha256}{ext}"
        lock = self._locks.setdefault(sha256, asyncio.Lock())
        async with lock:
            if target.is_file():
                self.hits += 1
                await asyncio.to_thread(os.utime, target)
                return target
            self.misses += 1
            await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
            tmp_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=FETCH_PREFIX, dir=self.cache_dir))
            try:
                path = await self._download(name, sha256, tmp_dir, stream)
                # MONAI's readers open it next: the shared check first (no data file, no bomb).
                await asyncio.to_thread(check_volume, path, ext)
                await asyncio.to_thread(os.replace, path, target)
            finally:
                await asyncio.to_thread(shutil.rmtree, tmp_dir, True)
            return target

    async def _download(self, name: str, sha256: str, tmp_dir: Path, stream: Callable[[Path], Any]) -> Path:
        url = ""
        try:
            url = (await self.datastore.get_download_url(name, expire_seconds=900)).url
        except LabelgridError:
            url = ""  # no URL for this backend or blob: the chunk stream still works
        if url.startswith(("http://", "https://")):
            path = tmp_dir / "blob"
            digest = hashlib.sha256()
            async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=10.0)) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise StorageError(f"the object store answered {response.status_code} for {name!r}")
                    with open(path, "wb") as file:
                        async for chunk in response.aiter_bytes(1024 * 1024):
                            digest.update(chunk)
                            await asyncio.to_thread(file.write, chunk)
            if digest.hexdigest() != sha256:
                raise StorageError(f"the bytes of {name!r} did not match their sha256")
            self.url_downloads += 1
            return path
        path = await stream(tmp_dir)
        got = await asyncio.to_thread(sha256_file, path)
        if got != sha256:
            raise StorageError(f"the bytes of {name!r} did not match their sha256")
        self.stream_downloads += 1
        return path

    def _trim(self, keep: AbstractSet[Path]) -> None:
        """Removes least recently used files over the budget, except `keep` and any file a fetch
        touched since the trim began (its mtime: a hit or a download of a job starting meanwhile)."""
        started = time.time() - 1.0  # a margin for file systems with coarse timestamps
        sized: list[tuple[float, int, Path]] = []
        for path in self._cached_files():
            try:
                found = path.stat()
            except FileNotFoundError:  # another job's trim took it
                continue
            sized.append((found.st_mtime, found.st_size, path))
        total = sum(size for _mtime, size, _path in sized)
        for mtime, size, path in sorted(sized):
            if total <= self.budget_bytes:
                return
            if path in keep or mtime >= started:
                continue
            total -= size
            path.unlink(missing_ok=True)


def _files(datalist: list[dict[str, str]]) -> list[Path]:
    return [Path(value) for item in datalist for key, value in item.items() if key != "image_id"]
