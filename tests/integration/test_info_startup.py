"""/info/ while the services start: MONAI Label answers only once its app is loaded, and
Slicer caches an answer without models (its panels stay hidden). So the gateway waits a
short while for a service it needs, then says 503 with Retry-After, and never answers 200
with empty models; once the service is up, /info/ lists its models."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.infer.api.servicer import create_service
from services.infer.app import build_inference
from services.infer.settings import InferSettings
from tests.fixtures.gateway import GatewayStack
from tests.fixtures.polling import wait_until
from tests.ports import free_port

pytestmark = pytest.mark.timeout(240)


class LateInference:
    """The real inference service (sample app, CPU), started on a fixed port when asked,
    in its own thread and event loop."""

    def __init__(self, port: int, datastore: str, work_dir: Path) -> None:
        self.settings = InferSettings(
            port=port, metrics_port=-1, datastore=datastore, device="cpu", work_dir=work_dir, torch_threads=1
        )
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        inference, datastore = await asyncio.to_thread(build_inference, self.settings)
        service = create_service(self.settings, inference, datastore)
        await service.start()
        await self._stop.wait()
        await service.stop(0)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[GatewayStack, int]]:
    port = free_port()
    gateway = GatewayStack(
        tmp_path,
        gateway_overrides={
            "inference_address": f"127.0.0.1:{port}",
            "info_wait_for": ["inference"],
            "info_timeout_seconds": 0.5,
        },
    ).start()
    yield gateway, port
    gateway.stop()


def test_info_is_503_with_retry_after_until_the_inference_service_answers(
    stack: tuple[GatewayStack, int], tmp_path: Path
) -> None:
    gateway, port = stack
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        waiting = http.get("/info/")
        assert waiting.status_code == 503, waiting.text
        assert int(waiting.headers["retry-after"]) > 0
        assert "inference" in waiting.json()["detail"]
        # The rest of the API does not wait for it.
        assert set(http.get("/datastore/").json()) == {"total", "completed", "label_tags"}

        inference = LateInference(port, gateway.datastore_address, tmp_path / "infer")
        inference.start()
        try:

            def answered() -> httpx.Response | None:
                answer = http.get("/info/")
                # Never a 200 without models while it starts.
                assert answer.status_code in (200, 503), answer.text
                if answer.status_code == 200:
                    return answer
                assert "retry-after" in answer.headers
                return None

            answer = wait_until(answered, "the inference service to answer", timeout=180, interval=0.2)
            info = answer.json()
            assert "segmentation" in info["models"] and info["name"] == "radiology"
            assert info["trainers"] == {} and info["strategies"] == {}  # not in this stack
            assert set(info["datastore"]) == {"total", "completed", "label_tags"}
        finally:
            inference.stop()
