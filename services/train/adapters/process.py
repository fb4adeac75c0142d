"""Starts a job's child process: the worker directly, or torchrun above one device.

The child runs in its own session (process group), so a stop reaches it and everything it
started (torchrun's workers) at once: SIGTERM, then SIGKILL after the grace period. Its
stdout and stderr become the job's log (and `train.log` in the job dir); its events file
is tailed and handed over as typed events (`services.train.domain.events`). The child watches the service's pid and exits when
the service is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import services
from services.train.domain import events

PROJECT_ROOT = Path(services.__file__).resolve().parent.parent
EVENT_POLL_SECONDS = 0.2


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [v.strip() for v in visible.split(",") if v.strip()] if visible else []


class ChildRun:
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        job_dir: Path,
        events: Path,
        on_line: Callable[[str], None],
        on_event: Callable[[events.Event], None],
    ):
        self.proc = proc
        self.pid = proc.pid
        self.job_dir = job_dir
        self.events = events
        self.on_line = on_line
        self.on_event = on_event
        self._offset = 0
        self._reader = asyncio.create_task(self._read_output())
        self._tailer = asyncio.create_task(self._tail_events())

    async def _read_output(self) -> None:
        assert self.proc.stdout is not None
        with open(self.job_dir / "train.log", "ab") as log_file:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    return
                log_file.write(line)
                log_file.flush()
                text = line.decode("utf-8", "replace").rstrip()
                if text:
                    self.on_line(text[:500])

    def _read_events(self) -> None:
        try:
            with open(self.events, "rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self._offset += end + 1
        for raw in data[: end + 1].splitlines():
            try:
                event = events.parse(json.loads(raw))
            except ValueError:
                continue
            if event is not None:
                self.on_event(event)

    async def _tail_events(self) -> None:
        while self.proc.returncode is None:
            self._read_events()
            await asyncio.sleep(EVENT_POLL_SECONDS)

    async def wait(self) -> int:
        # proc.wait() also waits for the child's stdout to close, which a process it started
        # may hold open long after the child is gone (torchrun's workers when torchrun died):
        # watch for the child's own exit, then kill what it left behind in its group.
        waiter = asyncio.ensure_future(self.proc.wait())
        while self.proc.returncode is None and not waiter.done():
            await asyncio.wait({waiter}, timeout=EVENT_POLL_SECONDS)
        code = self.proc.returncode
        assert code is not None
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), timeout=5)
        self._tailer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._tailer
        self._read_events()  # what it wrote last
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, timeout=5)
        return code

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def stop(self, grace_seconds: float) -> None:
        """SIGTERM to the whole group, SIGKILL after `grace_seconds`; returns once the child is gone."""
        if self.proc.returncode is not None:
            self._signal_group(signal.SIGKILL)  # the child is gone; what it started may not be
            return
        if grace_seconds > 0:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), timeout=grace_seconds)
            except TimeoutError:
                pass
        self._signal_group(signal.SIGKILL)
        await self.proc.wait()


class ProcessLauncher:
    def __init__(self, python: str = sys.executable) -> None:
        self.python = python

    def command(self, spec_path: Path, process_count: int) -> list[str]:
        worker = ["-m", "services.train.adapters.worker", str(spec_path)]
        if process_count <= 1:
            return [self.python, *worker]
        return [
            self.python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={process_count}", *worker,
        ]  # fmt: skip

    async def start(
        self,
        job_dir: Path,
        spec: dict[str, Any],
        devices: list[str],
        on_line: Callable[[str], None],
        on_event: Callable[[events.Event], None],
    ) -> ChildRun:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["LABELGRID_TRAIN_PARENT_PID"] = str(os.getpid())
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), os.getcwd(), *filter(None, [env.get("PYTHONPATH")])])
        gpus = [d for d in devices if d.startswith("cuda")]
        if gpus:
            visible = _visible_gpus()
            indices = [int(d.split(":", 1)[1]) if ":" in d else 0 for d in gpus]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] if i < len(visible) else str(i) for i in indices)
            spec = {**spec, "devices": [f"cuda:{i}" for i in range(len(gpus))]}
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
            threads = int(spec.get("torch_threads") or 0) or max(1, (os.cpu_count() or 1) // max(1, len(devices)))
            spec = {**spec, "devices": ["cpu"] * len(devices), "torch_threads": threads}
            env["OMP_NUM_THREADS"] = str(threads)
        spec_path = job_dir / "spec.json"
        events = Path(spec["events"])
        events.unlink(missing_ok=True)
        spec_path.write_text(json.dumps(spec, indent=1))
        proc = await asyncio.create_subprocess_exec(
            *self.command(spec_path, len(devices)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
            cwd=str(job_dir),
            start_new_session=True,
        )
        return ChildRun(proc, job_dir, events, on_line, on_event)
