"""services.common.bundles against a real datastore (local folder + SQLite, in-process): a bundle
replaced while a request or a training job still holds the old one.

The infer service takes its task when a request arrives and loads the network once the request
holds a slot; a replace in between must not pull the old bundle's files from under it.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from services.common.apps import LoadedApp
from services.common.bundles import BundleModels, publish_bundle
from services.common.datastore_client import DatastoreClient
from tests.fixtures.bundles import make_bundle, zip_folder
from tests.fixtures.datastore import local_datastore_client
from tests.fixtures.polling import eventually


@pytest.fixture
async def client(tmp_path: Path):
    async with local_datastore_client(tmp_path / "studies", timeout_seconds=30) as client:
        yield client


def empty_app() -> LoadedApp:
    return LoadedApp("tests", "tests", "bundles only", "0", {}, False)


def unpacked_folders(work_dir: Path, name: str) -> list[Path]:
    return sorted((work_dir / "bundles" / name).iterdir())


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


async def test_a_task_taken_before_a_replace_still_loads_and_its_files_go_with_it(
    client: DatastoreClient, tmp_path: Path
) -> None:
    work_dir = tmp_path / "work"
    models = BundleModels(empty_app(), client, work_dir, check_seconds=0)
    first = make_bundle(tmp_path / "a" / "ct_new", seed=11, train=True)
    await publish_bundle(client, zip_folder(first, tmp_path / "a" / "ct_new.zip"), tmp_path)
    await models.start()
    taken = models.app.infer_tasks["ct_new"]  # a request in flight, or a training job, holds this
    first_network = taken.initial_network()

    second = make_bundle(tmp_path / "b" / "ct_new", seed=12, train=True)
    await publish_bundle(client, zip_folder(second, tmp_path / "b" / "ct_new.zip"), tmp_path)
    assert await models.refresh() == ["ct_new"]
    replaced = models.app.infer_tasks["ct_new"]
    assert replaced is not taken and models.app.trainers["ct_new"].task is replaced

    # The old task reads its own configs and weights after the replace; the new one has its own.
    assert same_weights(taken.initial_network(), first_network)
    assert not same_weights(replaced.initial_network(), first_network)
    assert len(unpacked_folders(work_dir, "ct_new")) == 2

    kept = taken.bundle.root
    del taken, first_network

    def removed() -> bool:
        gc.collect()  # the finalizer runs when the bundle is collected, cycles included
        return not kept.exists()

    await eventually(removed, what="the old bundle's folder removed with its last holder")
    [left] = unpacked_folders(work_dir, "ct_new")
    assert replaced.bundle.root.is_relative_to(left)
    await models.stop()


async def test_folders_left_by_an_earlier_run_are_removed_at_start(client: DatastoreClient, tmp_path: Path) -> None:
    work_dir = tmp_path / "work"
    left = work_dir / "bundles" / "ct_new" / "v000001-crashed"
    left.mkdir(parents=True)
    (left / "model.pt").write_bytes(b"left by a killed process")
    first = make_bundle(tmp_path / "a" / "ct_new", seed=11, train=False)
    await publish_bundle(client, zip_folder(first, tmp_path / "a" / "ct_new.zip"), tmp_path)
    models = BundleModels(empty_app(), client, work_dir, check_seconds=0)
    await models.start()
    assert not left.exists()
    assert len(unpacked_folders(work_dir, "ct_new")) == 1
    models.app.infer_tasks["ct_new"].initial_network()
    await models.stop()
