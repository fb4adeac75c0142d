"""Decoding happens inside the queue slot: while one request holds the only slot (queue_limit
0), a burst of big volumes is refused RESOURCE_EXHAUSTED (QUEUE_FULL) without any of them being
decoded, so the inference process's peak resident memory (VmHWM of the real process) does not
move. Before, each refused request had read its volume first (one float32 copy each).

The request holding the slot is slow but small (a 64³ volume in many tiny sliding windows); the
burst's volumes are mostly zeros, gzipped: small uploads (no transport buffers to blur the
numbers), each 40 MiB once decoded."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import nibabel as nib
import numpy as np
import pytest
from google.protobuf import struct_pb2
from labelgrid.inference.v1 import inference_service_pb2 as inf_pb
from labelgrid.inference.v1 import inference_service_pb2_grpc as inf_grpc
from labelgrid.inference.v1 import resources_pb2 as res

from tests.fixtures.hostile import read_all, upload_messages
from tests.fixtures.processes import ServiceProcess, ServiceStartError, datastore_and_inference, peak_rss

pytestmark = pytest.mark.timeout(300)

MIB = 1024 * 1024
BIG = (256, 256, 160)
DECODED = int(np.prod(BIG)) * 4  # 40 MiB as float32
BURST = 6


def _nifti(shape: tuple[int, int, int]) -> bytes:
    data = np.zeros(shape, dtype=np.uint8)
    c = [n // 2 for n in shape]
    data[c[0] - 8 : c[0] + 8, c[1] - 8 : c[1] + 8, c[2] - 8 : c[2] + 8] = 200
    return gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes(), compresslevel=6, mtime=0)


@pytest.fixture(scope="module")
def inference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    # queue-limit 0 and one slot: the slow request holds the only place there is.
    one_slot = ("--no-warm-up", "--queue-limit", "0", "--concurrency-per-device", "1", "--torch-threads", "1")
    try:
        with datastore_and_inference(tmp_path_factory.mktemp("queue-rss"), *one_slot) as (_, inference):
            yield inference
    except ServiceStartError as error:
        pytest.fail(str(error))


def _infer(address: str, data: bytes, params: dict | None = None) -> grpc.StatusCode:
    extra = struct_pb2.Struct()
    extra.update(params or {})
    with grpc.insecure_channel(address) as channel:
        stub = inf_grpc.InferenceServiceStub(channel)
        header = inf_pb.InferUploadHeader(
            model="models/segmentation",
            image_file_name="image.nii.gz",
            image_size_bytes=len(data),
            params=res.InferParams(params=extra),
        )
        try:
            read_all(stub.InferUpload(upload_messages("inference", header, data), timeout=240))
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK


def _running(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = inf_grpc.InferenceServiceStub(channel)
        queues = stub.GetQueueStatus(inf_pb.GetQueueStatusRequest(model="models/segmentation"), timeout=10).queues
        return sum(q.running for q in queues)


def test_a_refused_burst_decodes_nothing(inference: ServiceProcess) -> None:
    small = _nifti((64, 64, 64))
    assert _infer(inference.address, small) == grpc.StatusCode.OK  # loads the model

    holder: list[grpc.StatusCode] = []
    slow = {"roi_size": [8, 8, 8], "sw_overlap": 0.75}  # 29³ windows of 8³: slow, little memory
    thread = threading.Thread(target=lambda: holder.append(_infer(inference.address, small, slow)))
    thread.start()
    while _running(inference.address) < 1:  # poll until the holder has the slot
        assert thread.is_alive(), holder
    # The peak so far (imports, the model load) would hide a later one: reset VmHWM to the RSS now.
    Path(f"/proc/{inference.proc.pid}/clear_refs").write_text("5")
    before = peak_rss(inference.proc.pid)

    big = _nifti(BIG)
    answers: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def client() -> None:
        code = _infer(inference.address, big)
        with lock:
            answers.append(code)

    burst = [threading.Thread(target=client) for _ in range(BURST)]
    for t in burst:
        t.start()
    for t in burst:
        t.join(timeout=240)
    still_running = thread.is_alive()
    growth = peak_rss(inference.proc.pid) - before
    thread.join(timeout=240)
    print(f"peak RSS growth {growth / MIB:.1f} MiB")
    # Decoding before the slot put at least one 40 MiB float32 volume (and its uint8 read) on top.
    assert growth < DECODED // 2, f"peak RSS grew by {growth / MIB:.0f} MiB while refusing the burst"
    assert holder == [grpc.StatusCode.OK]
    assert still_running, "the holder ended before the burst was answered; the burst proves nothing"
    assert answers == [grpc.StatusCode.RESOURCE_EXHAUSTED] * BURST
