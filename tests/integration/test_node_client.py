"""The Node client (clients/node) against a real stack behind a real Envoy.

A datastore and the inference service (sample app, CPU) run in-process on loopback ports;
Envoy, configured by gateway/envoy.py, is the edge. `node clients/node/list_models.mjs`
calls InferenceService.ListModels and DatastoreService.GetStatus with code generated from
protos/ by protoc-gen-es:
- over gRPC-web through Envoy (@connectrpc/connect-web over fetch: a browser's path),
- over native gRPC (HTTP/2) through Envoy, and straight to the services,
and what it prints must equal what the Python stubs get.

Node and the npm packages are part of `make test` (npm ci from clients/node/package-lock.json):
a missing node / npm or an uninstalled or stale node_modules FAILS these tests, it never skips.
The generated code under clients/node/gen is committed; it is regenerated here into a temp
folder and must match.
"""

from __future__ import annotations

import asyncio
import filecmp
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nibabel as nib
import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict
from labelgrid.datastore.v1 import datastore_service_pb2 as ds
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from labelgrid.inference.v1 import inference_service_pb2 as pb
from labelgrid.inference.v1 import inference_service_pb2_grpc as pb_grpc

from gateway.envoy import EnvoySettings
from services.datastore.settings import DatastoreSettings
from tests.contract.helpers import upload_image
from tests.fixtures.datastore import start_datastore
from tests.fixtures.edge import running_envoy
from tests.fixtures.gateway import real_inference
from tests.fixtures.node import CLIENT, REPO
from tests.fixtures.polling import eventually
from tests.ports import free_port

pytestmark = pytest.mark.timeout(240)

SCRIPT = CLIENT / "list_models.mjs"
ORIGIN = "http://viewer.example.test"


def buf_binary() -> str:
    beside = Path(sys.executable).parent / "buf"
    found = str(beside) if beside.is_file() else shutil.which("buf")
    if found is None:
        pytest.fail("buf is not installed (the dev extra's buf-bin)", pytrace=False)
    return found


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_generated_code_is_fresh(node: str, tmp_path: Path) -> None:
    """clients/node/gen is exactly what buf + the pinned protoc-gen-es make of protos/."""
    env = {**os.environ, "BUF_CACHE_DIR": str(REPO / ".buf-cache")}
    result = subprocess.run(
        [buf_binary(), "generate", "--template", "clients/node/buf.gen.yaml", "--output", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    fresh, committed = tmp_path / "clients" / "node" / "gen", CLIENT / "gen"
    stale = "clients/node/gen is stale: regenerate it (`make node-protos`) and commit"
    assert tree(fresh) == tree(committed), stale
    assert tree(fresh), "buf generated nothing"
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, sorted(tree(fresh)), shallow=False)
    assert not mismatch and not errors, f"{stale}: {mismatch + errors}"


def nifti(shape: tuple[int, int, int]) -> bytes:
    data = np.zeros(shape, dtype=np.float32)
    data[2:-2, 2:-2, 2:-2] = 1.0
    return gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes(), mtime=0)


@dataclass
class Edge:
    url: str  # Envoy's listener: gRPC-web, gRPC (h2c) and REST on one port
    admin_url: str
    inference_url: str
    datastore_url: str
    models: list[pb.Model]  # what the Python stub's ListModels returns
    status: ds.GetStatusResponse  # what the Python stub's GetStatus returns


def inference_healthy(admin_url: str) -> bool:
    """Whether every host of Envoy's inference cluster passes its health check."""
    with urllib.request.urlopen(f"{admin_url}/clusters", timeout=5) as answer:
        flags = [
            line
            for line in answer.read().decode().splitlines()
            if line.startswith("inference::") and "::health_flags::" in line
        ]
    return bool(flags) and all(line.endswith("::health_flags::healthy") for line in flags)


@pytest.fixture(scope="module")
async def edge() -> AsyncIterator[Edge]:
    with tempfile.TemporaryDirectory(prefix="labelgrid-node-") as tmp:
        root = Path(tmp)
        datastore = await start_datastore(
            DatastoreSettings(port=0, metrics_port=-1, backend="local", root=root / "studies", state_dir=root / "state")
        )
        inference_address, inference = await real_inference(root / "infer")(datastore.service.address)
        try:
            async with (
                grpc.aio.insecure_channel(datastore.service.address) as ds_channel,
                grpc.aio.insecure_channel(inference_address) as channel,
            ):
                ds_stub = ds_grpc.DatastoreServiceStub(ds_channel)
                await upload_image(ds_stub, nifti((12, 10, 8)), "cube.nii.gz", image_id="cube")
                models = list((await pb_grpc.InferenceServiceStub(channel).ListModels(pb.ListModelsRequest())).models)
                status = await ds_stub.GetStatus(ds.GetStatusRequest())
            settings = EnvoySettings(
                port=free_port(),
                admin_port=free_port(),
                gateway_address=f"127.0.0.1:{free_port()}",  # REST is not used here
                datastore_address=datastore.service.address,
                inference_address=inference_address,
            )
            envoy = running_envoy(settings, root, log_level="info")
            # Started in a thread: the servers share this event loop, and Envoy health-checks
            # inference while it starts (a blocked loop would fail those checks).
            await asyncio.to_thread(envoy.__enter__)
            try:
                admin_url = f"http://{settings.admin_host}:{settings.admin_port}"
                await eventually(
                    lambda: asyncio.to_thread(inference_healthy, admin_url),
                    "Envoy to see inference healthy",
                    timeout=30,
                )
                yield Edge(
                    url=f"http://127.0.0.1:{settings.port}",
                    admin_url=admin_url,
                    inference_url=f"http://{inference_address}",
                    datastore_url=f"http://{datastore.service.address}",
                    models=models,
                    status=status,
                )
            finally:
                await asyncio.to_thread(envoy.__exit__, None, None, None)
        finally:
            await inference.stop(0)
            await datastore.service.stop(0)


async def list_models(node: str, *args: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Runs the CLI (in a thread: the servers share this event loop) and parses its lines."""
    result = await asyncio.to_thread(
        subprocess.run,
        [node, str(SCRIPT), *args],
        cwd=CLIENT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"list_models.mjs {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines and set(lines[-1]) == {"datastoreStatus"}, result.stdout
    assert all(set(line) == {"model"} for line in lines[:-1]), result.stdout
    return [line["model"] for line in lines[:-1]], lines[-1]["datastoreStatus"]


def comparable(model: dict[str, Any]) -> dict[str, Any]:
    """A model's proto3 JSON, with devices reduced to their names (memory use changes per call)."""
    return {**model, "devices": [device["name"] for device in model.get("devices", [])]}


def check_output(edge: Edge, models: list[dict[str, Any]], status: dict[str, Any]) -> None:
    expected = [MessageToDict(model) for model in edge.models]
    assert [m["name"] for m in models] == [m.name for m in edge.models]
    assert [m["modelId"] for m in models] == [m.model_id for m in edge.models]
    assert "segmentation" in [m.model_id for m in edge.models]  # the sample app's; not an empty list
    # Both sides print canonical proto3 JSON, so the whole models must agree field by field.
    assert [comparable(m) for m in models] == [comparable(m) for m in expected]
    assert status == MessageToDict(edge.status, always_print_fields_with_no_presence=True)
    assert int(status["total"]) == 1


def envoy_counter(edge: Edge, name: str) -> int:
    with urllib.request.urlopen(f"{edge.admin_url}/stats?filter=^{name}$", timeout=10) as answer:
        text = answer.read().decode()
    return int(text.split(":", 1)[1]) if text.strip() else 0


@pytest.mark.parametrize(("transport", "protocol"), [("grpc-web", "http1"), ("grpc", "http2")])
async def test_list_models_through_envoy(node: str, edge: Edge, transport: str, protocol: str) -> None:
    """gRPC-web arrives at Envoy as HTTP/1.1 (fetch), native gRPC as h2c; both reach the services."""
    counter = f"http.edge.downstream_rq_{protocol}_total"
    before = await asyncio.to_thread(envoy_counter, edge, counter)
    models, status = await list_models(node, "--url", edge.url, "--transport", transport, "--origin", ORIGIN)
    check_output(edge, models, status)
    assert await asyncio.to_thread(envoy_counter, edge, counter) == before + 2  # ListModels, GetStatus


async def test_list_models_native_grpc_straight_to_the_services(node: str, edge: Edge) -> None:
    models, status = await list_models(
        node, "--url", edge.inference_url, "--datastore-url", edge.datastore_url, "--transport", "grpc"
    )
    check_output(edge, models, status)


def preflight(url: str) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(
        url,
        method="OPTIONS",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-grpc-web,x-user-agent",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, {k.lower(): v for k, v in answer.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}


async def test_browser_preflight_is_allowed(edge: Edge) -> None:
    """What a browser asks Envoy before its first gRPC-web call from another origin."""
    status, headers = await asyncio.to_thread(
        preflight, f"{edge.url}/labelgrid.inference.v1.InferenceService/ListModels"
    )
    assert status == 200, headers
    assert headers.get("access-control-allow-origin") == ORIGIN
    allowed = {h.strip() for h in headers.get("access-control-allow-headers", "").split(",")}
    assert {"content-type", "x-grpc-web", "x-user-agent"} <= allowed


async def test_unreachable_edge_is_a_clean_error(node: str) -> None:
    """An unreachable edge is a clean RPC error (status 1, JSON on stderr), not a crash."""
    result = await asyncio.to_thread(
        subprocess.run,
        [node, str(SCRIPT), "--url", f"http://127.0.0.1:{free_port()}", "--transport", "grpc", "--timeout-ms", "3000"],
        cwd=CLIENT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    error = json.loads(result.stderr.strip().splitlines()[-1])["error"]
    assert error["codeName"] == "Unavailable"
