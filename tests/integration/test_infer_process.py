"""The inference service as users run it: its own process next to a datastore process,
scraped for its domain metrics over HTTP."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import grpc
import pytest
from labelgrid.inference.v1 import inference_service_pb2_grpc as pb_grpc

from services.datastore.sample_studies import write_sample_studies
from tests.fixtures.inference import infer_request
from tests.fixtures.processes import ServiceProcess, ServiceStartError

pytestmark = pytest.mark.timeout(180)


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_inference_process_serves_and_exports_domain_metrics(tmp_path: Path):
    studies = tmp_path / "studies"
    write_sample_studies(studies, count=2, labeled=0, size=24)
    processes: list[ServiceProcess] = []
    try:
        datastore = ServiceProcess("services.datastore", "--root", str(studies), "--metrics-port", "-1")
        processes.append(datastore)
        inference = ServiceProcess(
            "services.infer",
            "--datastore",
            datastore.address,
            "--device",
            "cpu",
            "--work-dir",
            str(tmp_path / "infer"),
            "--metrics-port",
            "0",
        )
        processes.append(inference)
    except ServiceStartError as error:
        pytest.fail(str(error))
    try:
        before = scrape(inference.metrics_port)
        assert "labelgrid_inference_queue_waiting" in before
        assert re.search(r'labelgrid_device_memory_total_bytes\{device="cpu"\} [1-9]', before)
        with grpc.insecure_channel(inference.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            header = None
            for message in stub.Infer(infer_request("segmentation", "sample_00")):
                if message.WhichOneof("payload") == "header":
                    header = message.header
            assert header is not None and dict(header.label_names) == {"sphere_a": 1, "sphere_b": 2}
        after = scrape(inference.metrics_port)
        assert re.search(
            r'labelgrid_inference_model_version_info\{device="cpu",model="segmentation",version="untrained"\} 1\.0',
            after,
        )
        assert re.search(r'labelgrid_inference_queue_running\{device="cpu",model="segmentation"\} 0\.0', after)
        assert re.search(r"labelgrid_inference_model_loads_total 1\.0", after)
        assert re.search(
            r'grpc_server_handled_total\{grpc_code="OK",grpc_method="Infer",grpc_service="labelgrid.inference.v1.InferenceService",[^}]*\} 1\.0',
            after,
        )
    finally:
        codes = [process.stop() for process in reversed(processes)]
    assert codes == [0, 0], "".join(inference.output[-20:])
