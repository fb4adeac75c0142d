"""bench/soak.py stays runnable: a few seconds of its mixed traffic against a real `labelgrid up`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

SERVICES = {"datastore", "inference", "training", "activelearning", "gateway", "envoy", "labelgrid-up"}


def test_a_short_soak_runs_mixed_traffic_and_samples_every_service(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--seconds", "8", "--workers", "3", "--out", str(tmp_path), "--tag", "t"],
        capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "soak-t.json").read_text())
    assert set(result["rss"]) >= SERVICES, result["rss"]
    assert all(row["max_mib"] > 0 for row in result["rss"].values())
    assert len(result["samples"]) >= 2
    assert result["requests"] == sum(op["count"] for op in result["operations"].values()) > 0
    # The table is printed, with the fsck verdict of the studies the traffic wrote.
    assert "first MiB" in done.stdout and "fsck after the stack stopped" in done.stdout
    assert result["fsck"]["returncode"] == 0, result["fsck"]["output"]
    # Nothing went wrong that the soak counts as an error (no 5xx, no hang, hostile input refused 4xx).
    assert result["errors"] == 0, result["unexpected"]
