"""Spool cleanup at start never deletes another live process's uploads on the same folder: every
process holds a shared flock beside the spool folder, and only a process that starts alone
removes leftovers. Real processes, so the locks are real (flock is per open file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

HOLD = """
import sys
from pathlib import Path
from services.datastore.adapters.blobs import LocalBlobStore
store = LocalBlobStore(Path(sys.argv[1]))
spool = store.spool_dir() / "upload-slow.part"
spool.write_bytes(b"a slow upload")
import os, time
os.utime(spool, (time.time() - 7200, time.time() - 7200))  # older than any age rule
print("ready", flush=True)
sys.stdin.read()
"""

START = """
import sys
from pathlib import Path
from services.datastore.adapters.blobs import LocalBlobStore
LocalBlobStore(Path(sys.argv[1]))
"""


def _run(code: str, root: Path) -> None:
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, timeout=60, cwd=Path(__file__).parents[2])


def test_a_second_process_leaves_a_live_processs_spools_alone(tmp_path: Path) -> None:
    root = tmp_path / "studies"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).parents[2],
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        spool = root / ".labelgrid" / "tmp" / "upload-slow.part"
        assert spool.exists()
        _run(START, root)  # a replica starting on the same folder
        assert spool.exists(), "a live process's spool was deleted by another's start"
    finally:
        holder.kill()  # a crash: the spool is now a leftover
        holder.wait(30)
    _run(START, root)  # alone now: leftovers go
    assert not spool.exists()
    assert (root / ".labelgrid" / "tmp").is_dir() and (root / ".labelgrid" / "tmp.lock").exists()
    assert os.listdir(root / ".labelgrid" / "tmp") == []
