"""MONAI Bundles kept in the datastore, loaded into an app by every service that serves models.

A bundle is stored as a model artifact: the zip is a version of the model `<name>.bundle`
(newest version = the bundle in use; older ones stay for the record), so every replica of
inference, training and active learning gets the very same bundle without a shared disk.
The weights trained from it are versions of the model `<name>`, as for app models; while
none is published (or after a reset) the bundle's own `models/model.pt|ts` is served.

`publish_bundle` checks a bundle (folder or zip) and stores it, unless the same bytes are
already the newest; a different bundle under a known name also resets the served weights
(the old ones may not fit the new network). `BundleModels.refresh` brings an app's infer
tasks (and trainers) up to the bundles the datastore holds; services call it at start and
then every few seconds, so a bundle added with `PUT /model/{name}` appears everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pydantic
from labelgrid.datastore.v1 import datastore_service_pb2 as ds
from pydantic_settings import NoDecode

from services.common.apps import LoadedApp
from services.common.auth import ADMIN, current_identity
from services.common.chunks import sha256_file
from services.common.datastore_client import DatastoreClient
from services.common.errors import ErrorKind, InvalidArgument, LabelgridError, PermissionDenied
from services.common.models.types import RESET_VERSION_PREFIX
from services.common.settings import ServiceSettings, _split_list

log = logging.getLogger("labelgrid.bundles")


class BundleSettings(ServiceSettings):
    """Settings of a service that serves models (inference, training, active learning)."""

    # MONAI Bundles (folders or .zip) to store in the datastore and serve: `--bundle A --bundle B` or a comma list.
    bundle: Annotated[list[Path], NoDecode] = pydantic.Field(default_factory=list)
    # How often the datastore is asked for bundles added or replaced since (PUT /model/{name}); 0 only at start.
    bundle_check_seconds: Annotated[float, pydantic.Field(ge=0)] = 3.0

    @pydantic.field_validator("bundle", mode="before")
    @classmethod
    def _split_bundles(cls, value: Any) -> Any:
        return _split_list(value)


BUNDLE_MODEL_SUFFIX = ".bundle"
MODEL_SERVICES = frozenset({"inference", "training", "activelearning"})
RESET_FILE_NAME = "initial.txt"


def check_bundle_upload(model: str) -> None:
    """A bundle is code: only an admin, or a model service storing its --bundle, may store a version of
    a `<name>.bundle` model (whatever role the method itself needs); PERMISSION_DENIED otherwise."""
    if not model.endswith(BUNDLE_MODEL_SUFFIX):
        return
    identity = current_identity.get()
    if identity is None or identity.has_role(ADMIN) or identity.service in MODEL_SERVICES:
        return  # auth off, an admin, or inference / training / active learning
    raise PermissionDenied(f"storing MONAI Bundle {model!r} needs the admin role: a bundle is code")


def archive_model(name: str) -> str:
    """The datastore model whose versions are the bundle's zips."""
    return f"{name}{BUNDLE_MODEL_SUFFIX}"


def check_bundle_file(source: Path, scratch: Path) -> tuple[str, Path, dict[str, Any]]:
    """(name, zip to store, description) of a bundle folder or zip; InvalidArgument naming what is wrong.

    Blocking (builds the bundle with torch and MONAI): call it off the event loop.
    """
    from apps.bundle import BundleError, bundle_name, check_bundle, load_bundle, open_bundle, zip_bundle

    try:
        name = bundle_name(source)
        root = open_bundle(source, scratch / "unpacked")
        description = check_bundle(load_bundle(root, name))
        archive = source if source.is_file() else zip_bundle(root, scratch / f"{name}.zip")
    except BundleError as error:
        raise InvalidArgument(f"bundle {source.name!r}: {error}", reason="INVALID_BUNDLE") from None
    return name, archive, description


@dataclass(frozen=True)
class ResetMarker:
    """The one file (RESET_FILE_NAME) of a reset version: while it is the serving version,
    inference serves the model's initial weights; older versions stay for rollback."""

    version: str
    data: bytes
    info: dict[str, Any]


def reset_marker(model: str, reason: str) -> ResetMarker:
    """A new reset version of `model`, the same whoever publishes it (a service, the gateway)."""
    return ResetMarker(
        version=f"{RESET_VERSION_PREFIX}{uuid.uuid4().hex[:12]}",
        data=f"labelgrid: serve the initial weights of {model} ({reason})\n".encode(),
        info={"reset": True, "reason": reason},
    )


async def reset_weights(client: DatastoreClient, model: str, reason: str) -> str:
    """Publishes a reset version (ResetMarker); returns its version."""
    marker = reset_marker(model, reason)
    with tempfile.TemporaryDirectory(prefix="reset-") as scratch:
        path = Path(scratch) / RESET_FILE_NAME
        path.write_bytes(marker.data)
        await client.upload_model_version(model, path, metrics={}, info=marker.info, version=marker.version)
    return marker.version


async def latest_archive(client: DatastoreClient, name: str) -> Any | None:
    """The newest stored zip of bundle `name` (a ModelVersion), or None."""
    request = ds.GetModelVersionRequest(name=f"models/{archive_model(name)}/versions/serving")
    try:
        response = await client.call(
            f"looking up bundle {name!r}",
            lambda: client.stub.GetModelVersion(request, timeout=min(client.timeout, 10.0)),
        )
    except LabelgridError as error:
        if error.kind == ErrorKind.NOT_FOUND:
            return None
        raise
    return response.model_version


async def store_bundle(client: DatastoreClient, name: str, archive: Path, description: dict[str, Any]) -> bool:
    """Stores a checked bundle zip; False if these bytes already are the newest. A replaced bundle resets its weights."""
    sha = await asyncio.to_thread(sha256_file, archive)
    latest = await latest_archive(client, name)
    if latest is not None and latest.sha256 == sha:
        return False
    info = {
        key: description[key]
        for key in ("version", "type", "labels", "description", "torchscript", "trainable")
        if key in description
    }
    staged = archive
    if archive.name != "bundle.zip":
        staged_dir = Path(tempfile.mkdtemp(prefix="bundle-upload-"))
        staged = staged_dir / "bundle.zip"
        await asyncio.to_thread(shutil.copyfile, archive, staged)
    try:
        await client.upload_model_version(archive_model(name), staged, metrics={}, info={"bundle": info})
    finally:
        if staged is not archive:
            shutil.rmtree(staged.parent, ignore_errors=True)
    if latest is not None and await client.serving_version(name):
        await reset_weights(client, name, "bundle replaced")
    log.info("bundle stored", extra={"model": name, "sha256": sha})
    return True


async def publish_bundle(client: DatastoreClient, source: Path, work_dir: Path) -> str:
    """Checks a bundle folder or zip (`--bundle PATH`) and stores it; returns its model name."""
    scratch = Path(tempfile.mkdtemp(prefix="bundle-check-", dir=work_dir))
    try:
        name, archive, description = await asyncio.to_thread(check_bundle_file, Path(source), scratch)
        await store_bundle(client, name, archive, description)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return name


class BundleModels:
    """Keeps an app's bundle models in step with the bundles the datastore holds."""

    def __init__(
        self,
        app: LoadedApp,
        client: DatastoreClient,
        work_dir: Path,
        sources: list[Path] | None = None,
        check_seconds: float = 3.0,
        with_trainers: bool = True,
    ):
        self.app = app
        self.client = client
        self.work_dir = Path(work_dir) / "bundles"
        self.sources = [Path(p) for p in sources or []]
        self.check_seconds = check_seconds
        self.with_trainers = with_trainers
        self.loaded: dict[str, str] = {}  # name -> stored version in use
        self._app_models = set(app.infer_tasks)
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Stores the `--bundle` paths (a bad one stops the service: it was asked for), loads all, then keeps watching."""
        shutil.rmtree(self.work_dir, ignore_errors=True)  # unpacked by an earlier run of this service
        self.work_dir.mkdir(parents=True, exist_ok=True)
        from apps.bundle import BundleError, bundle_name

        for source in self.sources:
            try:
                name = bundle_name(source)
            except BundleError as error:
                raise InvalidArgument(f"bundle {str(source)!r}: {error}") from None
            if name in self._app_models:
                raise InvalidArgument(
                    f"bundle {name!r} has the name of one of the app's models; rename its folder or zip"
                )
            try:
                await publish_bundle(self.client, source, self.work_dir)
            except LabelgridError as error:
                if error.kind != ErrorKind.PERMISSION_DENIED:
                    raise
                # With auth on only the training service may publish model versions: it stores the
                # bundle (labelgrid up gives every model service the same --bundle); wait for it.
                await self._wait_for(name, error)
        await self.refresh()
        if self.check_seconds > 0:
            self._task = asyncio.create_task(self._watch(), name="bundle-watch")

    async def _wait_for(self, name: str, denied: LabelgridError, wait_seconds: float = 300.0) -> None:
        deadline = asyncio.get_running_loop().time() + wait_seconds
        log.info("waiting for the training service to store the bundle", extra={"model": name})
        while name not in await self._stored():
            if asyncio.get_running_loop().time() > deadline:
                raise InvalidArgument(
                    f"bundle {name!r}: this service may not store it ({denied.message}) and no other service did within {wait_seconds:.0f} s"
                )
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_seconds)
            try:
                await self.refresh()
            except Exception as error:  # noqa: BLE001 - keep watching; the datastore may be back next time
                log.warning("bundle refresh failed", extra={"error": str(error)})

    async def _stored(self) -> dict[str, str]:
        """name -> newest stored version, for every bundle in the datastore."""
        found: dict[str, str] = {}
        token = ""
        while True:
            request = ds.ListModelsRequest(page_size=1000, page_token=token)
            response = await self.client.call(
                "listing bundles",
                lambda request=request: self.client.stub.ListModels(request, timeout=self.client.timeout),  # type: ignore[misc]
            )
            for model in response.models:
                if model.model_id.endswith(BUNDLE_MODEL_SUFFIX) and model.serving_version:
                    found[model.model_id[: -len(BUNDLE_MODEL_SUFFIX)]] = model.serving_version
            token = response.next_page_token
            if not token:
                return found

    async def refresh(self) -> list[str]:
        """Loads bundles that are new or changed; returns the names (re)loaded."""
        async with self._lock:
            changed = []
            for name, version in (await self._stored()).items():
                if self.loaded.get(name) == version:
                    continue
                if name in self._app_models:
                    log.warning("bundle ignored: an app model has its name", extra={"model": name})
                    self.loaded[name] = version
                    continue
                try:
                    await self._load(name, version)
                    changed.append(name)
                except (LabelgridError, ValueError, OSError) as error:
                    log.error("bundle not loaded", extra={"model": name, "version": version, "error": str(error)})
                self.loaded[name] = version
            return changed

    async def _load(self, name: str, version: str) -> None:
        from apps.bundle import BundleInferTask, bundle_trainer, load_bundle, open_bundle

        folder = self.work_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        # Every load unpacks into a folder of its own, removed only once nothing holds the loaded
        # bundle: an inference or a training job that took the old task before a replace still
        # reads its configs and weights (removing them at the swap failed such a request).
        target = Path(tempfile.mkdtemp(prefix=f"{version}-", dir=folder))
        try:
            archive = await self.client.download_model_version(archive_model(name), version, target)

            def build() -> tuple[Any, Any]:
                bundle = load_bundle(open_bundle(archive, target / "unpacked"), name)
                task = BundleInferTask(bundle)
                trainer = None
                if self.with_trainers and bundle.trainable:
                    trainer = bundle_trainer(task)
                return task, trainer

            task, trainer = await asyncio.to_thread(build)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        # The task and the trainer hold the bundle; the folder goes with the bundle's last holder.
        weakref.finalize(task.bundle, shutil.rmtree, target, True)
        self.app.infer_tasks[name] = task
        self.app.bundles[name] = task.bundle
        if trainer is not None:
            self.app.trainers[name] = trainer
        else:
            self.app.trainers.pop(name, None)
        log.info("bundle loaded", extra={"model": name, "version": version, "labels": dict(task.labels)})
