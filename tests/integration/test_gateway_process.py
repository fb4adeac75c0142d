"""The gateway as users run it: `python -m gateway`, in its own process."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx
import pytest

from tests.fixtures.gateway import GatewayStack

pytestmark = pytest.mark.timeout(60)

READY = re.compile(r"gateway listening on http://127\.0\.0\.1:(\d+)")


def test_python_m_gateway_serves(gateway_stack: GatewayStack) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "--port",
            "0",
            "--datastore-address",
            gateway_stack.datastore_address,
            "--info-wait-for",  # no other service here: /info/ must not wait for them
            "",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        port = None
        for line in proc.stdout:  # type: ignore[union-attr]
            match = READY.search(line)
            if match:
                port = int(match[1])
                break
        assert port, "the gateway did not print its address"
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/auth/").json()["enabled"] is False
        assert set(httpx.get(base + "/info/").json()["datastore"]) == {
            "total",
            "completed",
            "label_tags",
        }
    finally:
        proc.terminate()
        proc.wait(20)
    # uvicorn shuts down gracefully, then re-raises the captured SIGTERM (its default exit).
    assert proc.returncode in (0, -signal.SIGTERM)
