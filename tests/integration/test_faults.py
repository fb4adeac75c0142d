"""Faults survived, nothing lost: real service processes killed by pid (SIGKILL) mid-request,
restarted, and checked with `python -m services.datastore fsck`; 100 concurrent writers on one image."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import nibabel as nib
import numpy as np
import pytest
from google.protobuf import struct_pb2
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc

from services.datastore.api.servicer import create_service
from services.datastore.app import build_datastore
from services.datastore.sample_studies import write_sample_studies
from services.datastore.settings import DatastoreSettings
from tests.fixtures.polling import wait_until
from tests.fixtures.processes import ServiceProcess, ServiceStartError

pytestmark = pytest.mark.timeout(300)

CHUNK = 1024 * 1024


def _start(module: str, *args: str) -> ServiceProcess:
    try:
        return ServiceProcess(module, *args)
    except ServiceStartError as error:
        pytest.fail(str(error))


def _fsck(store: tuple[str, ...], *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "services.datastore",
            "fsck",
            *store,
            *flags,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _endless_upload(stop: threading.Event) -> Iterator[pb.UploadImageRequest]:
    """A 'big' NIfTI that keeps arriving until the server goes away (or 1 GiB, as a bound)."""
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 4096))
    header.set_data_dtype(np.uint8)
    header.set_data_offset(352)
    yield pb.UploadImageRequest(header=pb.UploadImageHeader(image_id="big", file_name="big.nii"))
    yield pb.UploadImageRequest(chunk=header.binaryblock + b"\0" * (352 - len(header.binaryblock)))
    block = bytes(range(256)) * (CHUNK // 256)
    for _ in range(1024):
        if stop.is_set():
            return
        yield pb.UploadImageRequest(chunk=block)
    yield pb.UploadImageRequest(finish=common_pb2.UploadFinish())


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_kill_9_of_the_datastore_mid_upload_loses_nothing(backend: str, tmp_path: Path, request: pytest.FixtureRequest):
    root = tmp_path / "studies"
    write_sample_studies(root, count=2, labeled=1, size=16)
    store: tuple[str, ...] = ("--root", str(root))
    spool = root / ".labelgrid" / "tmp"
    if backend == "s3":
        # The same studies in a bucket (adopted at the first start), spooled under --state-dir.
        s3 = request.getfixturevalue("seaweedfs")
        bucket = s3.new_bucket()
        client = s3.client()
        client.make_bucket(bucket)
        for path in sorted(root.rglob("*.nii.gz")):
            relative = path.relative_to(root)
            key = f"images/{relative}" if len(relative.parts) == 1 else str(relative)
            client.fput_object(bucket, key, str(path))
        store = (
            "--backend", "s3", "--s3-endpoint", s3.endpoint, "--s3-access-key", s3.access_key,
            "--s3-secret-key", s3.secret_key, "--s3-bucket", bucket, "--state-dir", str(tmp_path / "state"),
        )  # fmt: skip
        spool = tmp_path / "state" / "spool"
    datastore = _start("services.datastore", *store, "--metrics-port", "-1")
    outcome: dict[str, object] = {}
    stop = threading.Event()

    def upload() -> None:
        with grpc.insecure_channel(datastore.address) as channel:
            try:
                pb_grpc.DatastoreServiceStub(channel).UploadImage(_endless_upload(stop), timeout=120)
                outcome["code"] = grpc.StatusCode.OK
            except grpc.RpcError as error:
                outcome["code"] = error.code()
            finally:
                stop.set()

    uploader = threading.Thread(target=upload)
    try:
        uploader.start()
        # Mid-upload: the spool already holds several MiB of it.
        wait_until(
            lambda: sum(p.stat().st_size for p in spool.glob("upload-*")) > 8 * CHUNK,
            "the upload to spool",
            interval=0.01,  # the upload is short: catch it mid-way
        )
        os.kill(datastore.proc.pid, signal.SIGKILL)
        assert datastore.proc.wait(30) == -signal.SIGKILL
        uploader.join(120)
        # Prompt: the client learns the server is gone, not its 120 s deadline.
        assert outcome.get("code") == grpc.StatusCode.UNAVAILABLE
    finally:
        stop.set()
        datastore.stop()
        uploader.join(120)

    # The killed upload's spool is its only trace: nothing is half-visible in the index or the
    # folder. The restarted datastore starts alone on its spool folder (its flock), so it
    # removes that leftover at once (fe387fa).
    assert list(spool.glob("upload-*"))
    restarted = _start("services.datastore", *store, "--metrics-port", "-1")
    try:
        assert not list(spool.glob("upload-*"))
        with grpc.insecure_channel(restarted.address) as channel:
            stub = pb_grpc.DatastoreServiceStub(channel)
            status = stub.GetStatus(pb.GetStatusRequest())
            assert (status.total, status.completed) == (2, 1)
            assert [i.image_id for i in stub.ListImages(pb.ListImagesRequest()).images] == ["sample_00", "sample_01"]
            with pytest.raises(grpc.RpcError) as missing:
                stub.GetImage(pb.GetImageRequest(name="images/big"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        assert restarted.stop() == 0
    assert not (root / "big.nii").exists()
    if backend == "s3":
        assert not [o.object_name for o in client.list_objects(bucket, prefix="images/big")]

    clean = _fsck(store, "--min-age", "0", "--checksums")
    assert clean.returncode == 0 and "fsck: clean" in clean.stdout, clean.stdout
    assert not list(spool.iterdir())

    again = _start("services.datastore", *store, "--metrics-port", "-1")
    try:
        with grpc.insecure_channel(again.address) as channel:
            assert pb_grpc.DatastoreServiceStub(channel).GetStatus(pb.GetStatusRequest()).total == 2
    finally:
        assert again.stop() == 0


# -- 100 concurrent writers on one image ---------------------------------------------


def _label_bytes(value: int) -> bytes:
    data = np.zeros((16, 16, 16), dtype=np.uint8)
    data[value % 16, :, :] = 1 + value % 200
    image = nib.Nifti1Image(data, np.eye(4))
    buffer = io.BytesIO()
    file_map = image.make_file_map({"image": buffer, "header": buffer})
    image.to_file_map(file_map)
    return buffer.getvalue()


def _struct(values: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def _label_upload(image_id: str, data: bytes, writer: int) -> Iterator[pb.UploadLabelRequest]:
    yield pb.UploadLabelRequest(
        header=pb.UploadLabelHeader(
            image=f"images/{image_id}",
            tag="final",
            file_name=f"{image_id}.nii",
            info=_struct({"writer": writer}),
        )
    )
    yield pb.UploadLabelRequest(chunk=data)
    yield pb.UploadLabelRequest(finish=common_pb2.UploadFinish(sha256=hashlib.sha256(data).hexdigest()))


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> DatastoreSettings:
    root = tmp_path / "studies"
    write_sample_studies(root, count=1, labeled=0, size=16)
    values: dict = {
        "port": 0,
        "metrics_port": -1,
        "root": root,
        "state_dir": tmp_path / "state",
    }
    if request.param == "postgres":
        values["index"] = request.getfixturevalue("postgres_url")
    return DatastoreSettings(**values)


async def test_100_concurrent_label_saves_and_info_updates_lose_nothing(
    settings: DatastoreSettings,
):
    datastore = await asyncio.to_thread(build_datastore, settings)
    service = create_service(settings, datastore)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = pb_grpc.DatastoreServiceStub(channel)
            labels = {writer: _label_bytes(writer) for writer in range(50)}

            async def save_label(writer: int) -> pb.UploadLabelResponse:
                return await stub.UploadLabel(_label_upload("sample_00", labels[writer], writer))

            async def merge_key(i: int) -> None:
                # Shallow merges of distinct keys: a lost update would drop a key.
                await stub.UpdateImageInfo(
                    pb.UpdateImageInfoRequest(name="images/sample_00", info=_struct({f"k{i}": i}))
                )

            conflicts = 0

            async def increment() -> None:
                # Read-modify-write with a precondition: retried on ABORTED, never silently lost.
                nonlocal conflicts
                while True:
                    image = await stub.GetImage(pb.GetImageRequest(name="images/sample_00"))
                    count = int(dict(image.image.info).get("count", 0))
                    try:
                        await stub.UpdateImageInfo(
                            pb.UpdateImageInfoRequest(
                                name="images/sample_00",
                                info=_struct({"count": count + 1}),
                                expected_revision=image.image.revision,
                            )
                        )
                        return
                    except grpc.aio.AioRpcError as error:
                        assert error.code() == grpc.StatusCode.ABORTED, error.details()
                        conflicts += 1

            before = (await stub.GetImage(pb.GetImageRequest(name="images/sample_00"))).image.revision
            saves = [save_label(w) for w in range(50)]
            merges = [merge_key(i) for i in range(25)]
            increments = [increment() for _ in range(25)]
            results = await asyncio.gather(*saves, *merges, *increments)

            image = (await stub.GetImage(pb.GetImageRequest(name="images/sample_00"))).image
            info = dict(image.info)
            assert {f"k{i}" for i in range(25)} <= set(info), "a merged info key was lost"
            assert int(info["count"]) == 25, f"increments lost: {info['count']} of 25 ({conflicts} conflicts retried)"
            # Every info write (25 merges + 25 increments) took its own revision.
            assert image.revision - before >= 50
            # Labels: last writer wins, whole: the stored bytes are the bytes of the writer the info names.
            label = (await stub.GetLabel(pb.GetLabelRequest(name="images/sample_00/labels/final"))).label
            assert label.revision == 50, "every save of the 50 took effect, one after another"
            writer = int(dict(label.info)["writer"])
            received = b""
            async for message in stub.DownloadLabel(pb.DownloadLabelRequest(name="images/sample_00/labels/final")):
                if message.WhichOneof("payload") == "chunk":
                    received += message.chunk
            assert received == labels[writer] and label.sha256 == hashlib.sha256(labels[writer]).hexdigest()
            assert all(r.label.image_id == "sample_00" for r in results[:50])
    finally:
        await service.stop(0)


# -- inference killed mid-infer ----------------------------------------------------------

GATEWAY_READY = re.compile(r"gateway listening on http://127\.0\.0\.1:(\d+)")


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(m[1]) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def test_kill_9_of_inference_mid_infer_is_a_prompt_503_and_a_restart_recovers(
    tmp_path: Path,
):
    studies = tmp_path / "studies"
    write_sample_studies(studies, count=1, labeled=0, size=96)
    datastore = _start("services.datastore", "--root", str(studies), "--metrics-port", "-1")
    infer_args = (
        "--datastore",
        datastore.address,
        "--device",
        "cpu",
        "--work-dir",
        str(tmp_path / "infer"),
    )
    inference = _start("services.infer", *infer_args, "--metrics-port", "0")
    gateway = subprocess.Popen(
        [
            sys.executable, "-m", "gateway", "--port", "0",
            "--datastore-address", datastore.address, "--inference-address", inference.address,
            "--info-wait-for", "",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    restarted: ServiceProcess | None = None
    try:
        port = None
        for line in gateway.stdout:  # type: ignore[union-attr]
            if match := GATEWAY_READY.search(line):
                port = int(match[1])
                break
        assert port, "the gateway did not start"
        threading.Thread(target=lambda: [None for _ in gateway.stdout], daemon=True).start()  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}/infer/segmentation?image=sample_00"
        statuses: list[int] = []

        def infer() -> None:
            statuses.append(httpx.post(url, data={"params": "{}"}, timeout=120).status_code)

        # Several at once: one runs, the others wait in the queue, so the kill lands mid-infer.
        callers = [threading.Thread(target=infer) for _ in range(4)]
        for caller in callers:
            caller.start()
        wait_until(
            lambda: (
                _metric(inference.metrics_port, "labelgrid_inference_queue_running") >= 1
                and _metric(inference.metrics_port, "labelgrid_inference_queue_waiting") >= 1
            ),
            "an inference running with others queued",
            interval=0.02,
        )
        os.kill(inference.proc.pid, signal.SIGKILL)
        inference.proc.wait(30)
        # The request it was running leaves its scratch folder (the downloaded volume) behind.
        scratch = tmp_path / "infer"
        leftovers = list(scratch.glob(f"infer-{inference.proc.pid}-*"))
        assert leftovers, sorted(p.name for p in scratch.iterdir())
        for caller in callers:
            caller.join(120)
        assert len(statuses) == 4 and 503 in statuses, statuses
        assert set(statuses) <= {200, 503}, statuses  # never a 500, never the 120 s timeout
        # While it is down: a prompt 503 too.
        assert httpx.post(url, data={"params": "{}"}, timeout=120).status_code == 503
        restarted = _start(
            "services.infer",
            *infer_args,
            "--metrics-port",
            "-1",
            "--port",
            str(inference.port),
        )
        wait_until(
            lambda: httpx.post(url, data={"params": "{}"}, timeout=120).status_code == 200,
            "inference back",
        )
        # The restarted service removed the dead process's scratch, and its own requests' too.
        assert not [p for p in leftovers if p.exists()]
        assert not list(scratch.glob("infer-*"))
    finally:
        gateway.terminate()
        gateway.wait(20)
        for process in (restarted, inference, datastore):
            if process is not None:
                process.stop()
