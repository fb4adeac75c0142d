"""README's Troubleshooting, as a user meets it: `labelgrid up` on a port that is taken.

The stack must refuse before it starts anything, name the port, the option that moves it and
what holds it, and exit 1; the README quotes that message (port numbers aside).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docs.test_readme import BLOCKS
from tests.fixtures.labelgrid_up import port_flags
from tests.ports import free_ports

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def listening() -> Iterator[int]:
    """A loopback port another program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def up(tmp_path: Path, **chosen: int) -> subprocess.CompletedProcess[str]:
    flags = port_flags()
    argv = [
        sys.executable,
        "-m",
        "gateway.cli",
        "up",
        "--studies",
        str(tmp_path / "studies"),
        "--work-dir",
        str(tmp_path / "var"),
    ]
    for flag, port in zip(flags, free_ports(len(flags)), strict=True):
        argv += [flag, str(chosen.get(flag, port))]
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)


def test_a_taken_envoy_admin_port_is_named_before_anything_starts(tmp_path: Path, listening: int) -> None:
    done = up(tmp_path, **{"--admin-port": listening})
    assert done.returncode == 1, done.stdout
    assert f"port {listening} on 127.0.0.1 (--admin-port, Envoy's admin) is in use" in done.stdout
    assert "start with --admin-port PORT" in done.stdout and "labelgrid did not start" in done.stdout
    assert "started " not in done.stdout, "nothing is started when a port is taken"
    assert not (tmp_path / "studies").exists()

    # The README quotes this message (with 9901) in its Troubleshooting section.
    quoted = [
        block.code for block in BLOCKS if block.lang == "text" and "is in use: another labelgrid up" in block.code
    ]
    assert quoted, "README's Troubleshooting quotes the taken-port message"
    [line] = [line for line in done.stdout.splitlines() if "is in use" in line]
    message = line.split("| ", 1)[1]
    for text in quoted:
        pattern = re.escape(text.strip().splitlines()[0].split("| ", 1)[-1]).replace("9901", r"\d+")
        assert re.fullmatch(pattern, message), f"README quotes:\n{text}\nlabelgrid up prints:\n{message}"


def test_a_port_given_twice_is_refused(tmp_path: Path) -> None:
    [port] = free_ports(1)
    done = up(tmp_path, **{"--gateway-port": port, "--datastore-port": port})
    assert done.returncode == 1, done.stdout
    assert f"port {port} is given twice: --gateway-port (the REST gateway) and --datastore-port" in done.stdout
