"""What README's Datastore section says of a killed upload's spool: fsck (like a datastore) that
starts alone on the spool folder removes every leftover there at once, so plain fsck has nothing
of it to report; while another process uses the folder nothing goes at start, fsck reports the
old leftover and `--repair` removes it."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.datastore.sample_studies import write_sample_studies

pytestmark = pytest.mark.timeout(120)


def _fsck(root: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "services.datastore", "fsck", "--root", str(root), *flags]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=100)


def _plant(spool: Path, age_seconds: float) -> Path:
    leftover = spool / "upload-killed.part"
    leftover.write_bytes(b"half an upload")
    then = time.time() - age_seconds
    os.utime(leftover, (then, then))
    return leftover


def test_a_killed_uploads_spool_goes_when_fsck_runs_alone_and_by_repair_beside_a_live_process(tmp_path: Path):
    root = tmp_path / "studies"
    write_sample_studies(root, count=2, labeled=1, size=12)
    first = _fsck(root)
    assert first.returncode == 0, first.stdout + first.stderr
    spool = root / ".labelgrid" / "tmp"
    assert spool.is_dir()

    # Another process (a live datastore) uses the folder: it holds the shared lock beside it.
    fd = os.open(spool.parent / f"{spool.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        leftover = _plant(spool, age_seconds=7200)
        found = _fsck(root)
        assert found.returncode == 1, found.stdout + found.stderr
        assert "half-written-spool" in found.stdout and leftover.name in found.stdout, found.stdout
        assert leftover.exists()
        fixed = _fsck(root, "--repair")
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert not leftover.exists()
    finally:
        os.close(fd)

    # Alone: even a fresh leftover goes as fsck opens the store, and there is nothing to report.
    leftover = _plant(spool, age_seconds=0)
    alone = _fsck(root)
    assert alone.returncode == 0 and "fsck: clean" in alone.stdout, alone.stdout + alone.stderr
    assert not leftover.exists()
