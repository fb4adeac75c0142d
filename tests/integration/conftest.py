"""A real datastore and a real gateway (uvicorn) on ephemeral loopback ports, for the gateway tests.

Both run in one background thread with its own event loop, so tests can be plain sync code
driving the gateway over HTTP (the official MONAI Label client, httpx) while the servers serve.
`real_inference` adds the real inference service (sample app apps.radiology, CPU) to that loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings
from services.common.server import GrpcService
from services.datastore.settings import DatastoreSettings
from services.infer.api.servicer import create_service
from services.infer.app import build_inference
from services.infer.settings import InferSettings
from tests.fixtures.datastore import start_datastore
from tests.ports import free_port


def real_inference(
    work_dir: Path, **overrides: Any
) -> Callable[[str], Awaitable[tuple[str, GrpcService]]]:
    """A `GatewayStack.start_inference` that serves the real inference service in-process,
    as `python -m services.infer` does (CPU, the sample app), against the stack's datastore."""

    async def start(datastore_address: str) -> tuple[str, GrpcService]:
        settings = InferSettings(
            port=0,
            metrics_port=-1,
            datastore=datastore_address,
            device="cpu",
            work_dir=work_dir,
            version_check_seconds=0.2,
            **overrides,
        )
        inference, datastore = await asyncio.to_thread(build_inference, settings)
        service = create_service(settings, inference, datastore)
        await service.start()
        return service.address, service

    return start


@dataclass
class GatewayStack:
    """A datastore and a gateway served from one thread's event loop."""

    root: Path
    gateway_overrides: dict[str, Any] = field(default_factory=dict)
    datastore_overrides: dict[str, Any] = field(default_factory=dict)
    # Starts an inference gRPC server in the stack's loop, given the datastore's address;
    # returns its address and the grpc.aio.Server. None: no inference service (a closed port).
    start_inference: Callable[[str], Awaitable[tuple[str, Any]]] | None = None
    url: str = ""
    datastore_address: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stop: asyncio.Event | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    def start(self) -> GatewayStack:
        self._thread = threading.Thread(
            target=self._run, name="gateway-stack", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("gateway stack did not start in 60 s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as err:  # noqa: BLE001 - reported to the test thread
            self._error = err
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ds_values: dict[str, Any] = {
            "port": 0,
            "metrics_port": -1,
            "backend": "local",
            "root": self.root / "studies",
            "state_dir": self.root / "state",
            "max_upload_bytes": 32 * 1024 * 1024,
        }
        ds_values.update(self.datastore_overrides)  # may replace any of these (backend too)
        ds_settings = DatastoreSettings(**ds_values)
        datastore = await start_datastore(ds_settings)
        self.datastore_address = datastore.address
        inference_address, inference_server = f"127.0.0.1:{free_port()}", None
        if self.start_inference is not None:
            inference_address, inference_server = await self.start_inference(
                datastore.address
            )
        values: dict[str, Any] = {
            "port": 0,
            "metrics_port": -1,
            "datastore_address": datastore.address,
            "inference_address": inference_address,
            # Not started here: closed ports, never whatever else listens on the defaults.
            "training_address": f"127.0.0.1:{free_port()}",
            "activelearning_address": f"127.0.0.1:{free_port()}",
            "info_timeout_seconds": 2.0,
            # A stack of some services only: /info/ does not wait for the others.
            "info_wait_for": [],
        }
        values.update(self.gateway_overrides)
        settings = GatewaySettings(**values)
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings),
                host="127.0.0.1",
                port=0,
                log_level="warning",
                lifespan="on",
            )
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("uvicorn exited before it started")
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        await self._stop.wait()
        server.should_exit = True
        await task
        if inference_server is not None:
            await inference_server.stop(0)
        await datastore.service.stop(0)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)


@pytest.fixture(scope="module")
def gateway_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    stack = GatewayStack(tmp_path_factory.mktemp("gateway")).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def gateway_url(gateway_stack: GatewayStack) -> str:
    return gateway_stack.url


@pytest.fixture(scope="module")
def inference_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayStack]:
    """Datastore, real inference service and gateway; the inference scratch dir is root/infer."""
    root = tmp_path_factory.mktemp("inference")
    stack = GatewayStack(root, start_inference=real_inference(root / "infer")).start()
    yield stack
    stack.stop()
