"""The Python SDK (labelgrid.client) against a real datastore served in-process on loopback:
chunked uploads and verified downloads, bearer tokens, retry on UNAVAILABLE, clean CLI errors,
and the packaging that puts the hand-written SDK inside the generated `labelgrid` package."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import grpc
import labelgrid.client
import nibabel as nib
import numpy as np
import pytest
from labelgrid.client import (
    Client,
    LabelgridError,
    NotFound,
    Unauthenticated,
    Unavailable,
)

from services.datastore.settings import DatastoreSettings
from tests.fixtures.datastore import RunningDatastore, start_datastore
from tests.fixtures.polling import eventually
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
TOKEN = "sdk-test-token"
CHUNK = 64 * 1024  # small chunks, so that a file of a few hundred KiB is many messages


def write_volume(path: Path, shape: tuple[int, int, int] = (48, 40, 32)) -> Path:
    rng = np.random.default_rng(7)
    data = rng.random(shape, dtype=np.float32)  # incompressible: several chunks
    path.write_bytes(gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes(), compresslevel=1, mtime=0))
    return path


def settings(root: Path, *, port: int = 0, tokens: list[str] | None = None) -> DatastoreSettings:
    return DatastoreSettings(port=port, metrics_port=-1, backend="local", root=root / "studies",
                             state_dir=root / "state", auth_tokens=tokens or [])  # fmt: skip


@pytest.fixture
async def datastore(tmp_path: Path) -> RunningDatastore:
    running = await start_datastore(settings(tmp_path, tokens=[TOKEN]))
    yield running
    await running.service.stop(0)


async def test_upload_and_download_in_chunks_with_a_token(datastore: RunningDatastore, tmp_path: Path) -> None:
    volume = write_volume(tmp_path / "vol.nii.gz")
    assert volume.stat().st_size > 3 * CHUNK
    seen: list[tuple[int, int]] = []

    def flow() -> None:
        with Client(datastore.address, token=TOKEN, chunk_bytes=CHUNK) as client:
            image = client.upload_image(
                volume, "vol", info={"client_id": "sdk"}, progress=lambda d, t: seen.append((d, t))
            )
            assert image.image_id == "vol" and image.sha256 == hashlib.sha256(volume.read_bytes()).hexdigest()
            got = client.download_image("vol", tmp_path / "back.nii.gz")
            assert got.sha256 == image.sha256 and got.path.read_bytes() == volume.read_bytes()
            assert [i.image_id for i in client.list_images(page_size=1)] == ["vol"]
            with pytest.raises(NotFound) as err:
                client.download_label("vol", "final", tmp_path / "none.nii.gz")
            assert err.value.reason == "LABEL_NOT_FOUND" and err.value.code == grpc.StatusCode.NOT_FOUND
            assert not (tmp_path / "none.nii.gz").exists()

    await asyncio.to_thread(flow)
    size = volume.stat().st_size
    assert seen[0] == (0, size) and seen[-1] == (size, size) and len(seen) > 3


async def test_sessions(datastore: RunningDatastore, tmp_path: Path) -> None:
    source = write_volume(tmp_path / "local.nii.gz")

    def run() -> None:
        with Client(datastore.address, token=TOKEN, chunk_bytes=CHUNK) as client:
            session = client.create_session(source, expiry_seconds=60, meta={"k": "v"}, owner="client:sdk")
            assert session.name == f"sessions/{session.session_id}" and session.expiry_seconds == 60
            # A caller with a user's token owns its sessions, whatever owner it asks for.
            assert client.get_session(session.session_id, touch=True).owner.startswith("user:")
            got = client.download_session(session.name, tmp_path / "copy.nii.gz")
            assert got.path.read_bytes() == source.read_bytes() and got.sha256 == session.sha256
            assert client.delete_session(session.session_id).session_id == session.session_id
            with pytest.raises(NotFound):
                client.get_session(session.session_id)

    await asyncio.to_thread(run)


async def test_a_wrong_or_missing_token_is_unauthenticated(datastore: RunningDatastore) -> None:
    def calls() -> None:
        for token in ("wrong", None):
            with Client(datastore.address, token=token, retries=0) as client, pytest.raises(Unauthenticated) as err:
                list(client.list_images())
            assert "UNAUTHENTICATED" in str(err.value)

    await asyncio.to_thread(calls)


async def test_unavailable_is_retried_with_backoff(tmp_path: Path) -> None:
    """A call made while the datastore is still down succeeds once it is up."""
    port = free_port()
    failed_once = threading.Event()

    class WatchedClient(Client):
        def _sleep_before_retry(self, attempt: int) -> None:
            failed_once.set()
            super()._sleep_before_retry(attempt)

    def list_while_starting() -> list[str]:
        with WatchedClient(f"127.0.0.1:{port}", retries=8, backoff=0.1, max_backoff=1.0) as client:
            return [image.image_id for image in client.list_images()]

    call = asyncio.create_task(asyncio.to_thread(list_while_starting))
    await eventually(failed_once.is_set, "a first attempt to fail (nothing listens yet)", timeout=30)
    running = await start_datastore(settings(tmp_path, port=port))
    try:
        assert await call == []
    finally:
        await running.service.stop(0)


def test_no_retries_left_is_unavailable() -> None:
    with (
        Client(f"127.0.0.1:{free_port()}", retries=1, backoff=0.01, timeout=5) as client,
        pytest.raises(Unavailable) as err,
    ):
        client.list_models()
    assert isinstance(err.value, LabelgridError) and err.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_missing_file_fails_before_any_call(tmp_path: Path) -> None:
    with Client(f"127.0.0.1:{free_port()}") as client, pytest.raises(FileNotFoundError):
        client.upload_image(tmp_path / "missing.nii.gz")


async def test_cli_token_errors_are_one_line(datastore: RunningDatastore, tmp_path: Path) -> None:
    def cli(*args: str, token: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LABELGRID_TOKEN": token}
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args, "--target", datastore.address],
                              capture_output=True, text=True, timeout=120, check=False, env=env, cwd=tmp_path)  # fmt: skip

    wrong = await asyncio.to_thread(cli, "images", "list", token="wrong")
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("labelgrid: error: ") and "UNAUTHENTICATED" in wrong.stderr
    assert "Traceback" not in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
    right = await asyncio.to_thread(cli, "images", "list", "--json", token=TOKEN)
    assert right.returncode == 0 and right.stdout == "", right.stderr


def test_editable_install_maps_the_sdk_beside_the_generated_code() -> None:
    import labelgrid.datastore.v1.datastore_service_pb2 as generated

    assert Path(labelgrid.client.__file__).resolve().is_relative_to(REPO / "sdk" / "labelgrid" / "client")
    assert Path(generated.__file__).resolve().is_relative_to(REPO / "protos" / "gen" / "python")


def test_wheel_installs_the_sdk_inside_the_labelgrid_package(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
                           capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("labelgrid-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"labelgrid/client/__init__.py", "labelgrid/client/cli.py", "labelgrid/__init__.py",
            "labelgrid/datastore/v1/datastore_service_pb2.py"} <= names  # fmt: skip
    assert not any(name.startswith(("sdk/", "protos/")) for name in names)
    site = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    probe = ("import labelgrid.client, labelgrid.datastore.v1.datastore_service_pb2 as g; "
             "print(labelgrid.client.__file__); print(g.__file__)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert all(Path(line).is_relative_to(site) for line in result.stdout.split()), result.stdout


async def test_next_sample_says_why_nothing_was_handed_out(tmp_path: Path) -> None:
    """`next_sample` keeps answering None; `next_sample_result` and the CLI give the reason."""
    from labelgrid.activelearning.v1 import activelearning_service_pb2 as al_pb
    from labelgrid.activelearning.v1 import activelearning_service_pb2_grpc as al_grpc
    from labelgrid.client import NoSample

    class Servicer(al_grpc.ActiveLearningServiceServicer):
        async def NextSample(self, request, context):  # type: ignore[no-untyped-def]
            return al_pb.NextSampleResponse(no_sample_reason=al_pb.NO_SAMPLE_REASON_ALL_LEASED)

    server = grpc.aio.server()
    al_grpc.add_ActiveLearningServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:

        def calls() -> tuple[object, object]:
            with Client(f"127.0.0.1:{port}", retries=0) as client:
                return client.next_sample("annotator"), client.next_sample_result("annotator", "first")

        plain, result = await asyncio.to_thread(calls)
        assert plain is None
        assert isinstance(result, NoSample) and result.reason == "ALL_LEASED" and not result

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "gateway.cli", "next-sample", "--client-id", "annotator", *args,
                                   "--target", f"127.0.0.1:{port}"],
                                  capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)  # fmt: skip

        as_json = await asyncio.to_thread(cli, "--json")
        assert as_json.returncode == 0, as_json.stderr
        assert json.loads(as_json.stdout) == {"image": None, "reason": "ALL_LEASED"}
        as_text = await asyncio.to_thread(cli)
        assert as_text.returncode == 0 and "ALL_LEASED" in as_text.stdout, as_text.stdout + as_text.stderr
    finally:
        await server.stop(0)
