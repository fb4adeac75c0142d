"""A bounded soak: `labelgrid up` on loopback under mixed traffic for N minutes.

    python -m bench.soak [--minutes 30 | --seconds S] [--workers 4] [--out bench/results] [--tag T]

Starts `labelgrid up` (CPU, sample studies, every port free below the kernel's ephemeral
range) in a temporary folder and sends, from --workers threads, a weighted mix of what
annotators do: uploads (to a bounded pool of ids, so the store does not grow without end),
listings, next samples, inferences, label saves, info updates, and now and then a hostile
request (header indirection, bad ids, deep JSON, broken gzip, unknown images) that must get
a 4xx. Every --sample-seconds (60 by default) it records the resident memory (RSS) of every
service process; at the end it stops the stack, runs `python -m services.datastore fsck`
on the studies folder and prints a table: RSS first/last/max per service, and the answers
per operation by status. The JSON goes under --out. Numbers, not assertions: exit 0 unless
the stack did not start.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import psutil

from tests.ports import free_ports

ROOT = Path(__file__).resolve().parent.parent
UP = "labelgrid is up: MONAI Label API at "
PORT_FLAGS = (
    "--port", "--admin-port", "--gateway-port", "--datastore-port", "--inference-port",
    "--training-port", "--activelearning-port",
)  # fmt: skip
ROLES = {
    "services.datastore": "datastore", "services.infer": "inference", "services.train": "training",
    "services.activelearning": "activelearning", "gateway": "gateway",
}  # fmt: skip
SAMPLES = [f"sample_{n:02d}" for n in range(6)]
UPLOAD_POOL = 20  # soak_00 .. soak_19, overwritten again and again: bounded disk


# -- the stack -----------------------------------------------------------------------------


@dataclass
class Stack:
    proc: subprocess.Popen[str]
    url: str
    studies: Path
    output: list[str] = field(default_factory=list)

    def processes(self) -> dict[str, psutil.Process]:
        """The supervisor and its children by role (a child's own workers as ROLE+workers)."""
        try:
            supervisor = psutil.Process(self.proc.pid)
            children = supervisor.children()
        except psutil.NoSuchProcess:
            return {}
        found: dict[str, psutil.Process] = {"labelgrid-up": supervisor}
        for child in children:
            try:
                argv = child.cmdline()
            except psutil.Error:
                continue
            role = next((r for marker, r in ROLES.items() if marker in argv), None)
            if role is None and argv and argv[0].endswith("envoy"):
                role = "envoy"
            if role is not None:
                found.setdefault(role, child)
        return found


def start_stack(work: Path, timeout: float) -> Stack:
    ports = free_ports(len(PORT_FLAGS))
    studies = work / "studies"
    argv = [
        sys.executable, "-m", "gateway.cli", "up", "--studies", str(studies), "--sample-studies",
        "--work-dir", str(work / "var"), "--device", "cpu", "--train-device", "cpu", "--scoring-device", "cpu",
    ]  # fmt: skip
    for flag, port in zip(PORT_FLAGS, ports, strict=True):
        argv += [flag, str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    stack = Stack(proc, f"http://127.0.0.1:{ports[0]}", studies)

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            stack.output.append(line)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not any(UP in line for line in stack.output):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_stack(stack)
            raise RuntimeError("labelgrid up did not start:\n" + "".join(stack.output[-60:]))
        time.sleep(0.2)
    return stack


def stop_stack(stack: Stack) -> int | None:
    """SIGTERM to the supervisor (it stops its children in order), SIGKILL after 60 s."""
    children = [p for role, p in stack.processes().items() if role != "labelgrid-up"]
    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGTERM)
        try:
            stack.proc.wait(60)
        except subprocess.TimeoutExpired:
            stack.proc.kill()
            stack.proc.wait()
    for child in children:  # by pid, only ours
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    return stack.proc.returncode


# -- what is sent --------------------------------------------------------------------------


def nifti_bytes(data: np.ndarray, compress: bool = True) -> bytes:
    image = nib.Nifti1Image(data, np.eye(4))
    buffer = io.BytesIO()
    image.to_file_map(image.make_file_map({"image": buffer, "header": buffer}))
    raw = buffer.getvalue()
    return gzip.compress(raw, compresslevel=1) if compress else raw


def hostile_requests(label: bytes) -> list[tuple[str, Callable[[httpx.Client], httpx.Response]]]:
    """Requests that must be refused with a 4xx (never a 5xx, never stored)."""
    nrrd = b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\x1cdata file: /etc/hostname\n\n"
    broken_gzip = gzip.compress(label)[:-8] + b"\xff\xff\xff\x7f\x00\x00\x00\x10"
    deep = "[" * 100_000 + "]" * 100_000
    return [
        (
            "nrrd-data-file",
            lambda h: h.put("/datastore/", params={"image": "hostile_nrrd"}, files={"file": ("x.nrrd", nrrd)}),
        ),
        (
            "nrrd-infer-upload",
            lambda h: h.post(
                "/infer/segmentation",
                params={"output": "json"},
                files={"file": ("x.nrrd", nrrd)},
                data={"params": "{}"},
            ),
        ),
        ("id-newline", lambda h: h.put("/datastore/image/info", params={"image": "sample_00\n"}, data={"info": "{}"})),
        ("id-dotdot", lambda h: h.get("/datastore/image", params={"image": "../../etc/passwd"})),
        (
            "deep-json",
            lambda h: h.post("/activelearning/random", content=deep, headers={"content-type": "application/json"}),
        ),
        (
            "bad-json-params",
            lambda h: h.put(
                "/datastore/label",
                params={"image": "sample_00", "tag": "final"},
                files={"label": ("l.nii.gz", label)},
                data={"params": "{not json"},
            ),
        ),
        (
            "broken-gzip",
            lambda h: h.put("/datastore/", params={"image": "hostile_gzip"}, files={"file": ("x.nii.gz", broken_gzip)}),
        ),
        ("unknown-image", lambda h: h.post("/infer/segmentation", params={"image": "no_such_image", "output": "json"})),
        (
            "huge-roi",
            lambda h: h.post(
                "/infer/segmentation",
                params={"image": "sample_00", "output": "json"},
                data={"params": json.dumps({"roi_size": [100000, 100000, 100000]})},
            ),
        ),
    ]


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    unexpected: list[str] = field(default_factory=list)  # the first 200, for the report
    errors: Counter[str] = field(default_factory=Counter)  # by status

    def add(self, op: str, status: str, took: float, ok: bool, detail: str = "") -> None:
        with self.lock:
            self.statuses[op][status] += 1
            self.seconds[op].append(took)
            if not ok:
                self.errors[status] += 1
                if len(self.unexpected) < 200:
                    self.unexpected.append(f"{op}: {status} {detail[:200]}")


def worker(n: int, url: str, until: float, tally: Tally, image: bytes, label: bytes, seed: int) -> None:
    rng = random.Random(seed + n)
    client_id = f"soak-{n}"
    hostile = hostile_requests(label)

    def upload(h: httpx.Client) -> httpx.Response:
        return h.put(
            "/datastore/",
            params={"image": f"soak_{rng.randrange(UPLOAD_POOL):02d}"},
            data={"params": json.dumps({"client_id": client_id})},
            files={"file": ("soak.nii.gz", image)},
        )

    def save_label(h: httpx.Client) -> httpx.Response:
        return h.put(
            "/datastore/label",
            params={"image": rng.choice(SAMPLES), "tag": "final"},
            data={"params": json.dumps({"label_info": [{"name": "sphere_a", "idx": 1}]})},
            files={"label": ("label.nii.gz", label)},
        )

    def update_info(h: httpx.Client) -> httpx.Response:
        return h.put(
            "/datastore/image/info",
            params={"image": rng.choice(SAMPLES)},
            data={"info": json.dumps({"soak_worker": n, "at": time.time()})},
        )

    ops: list[tuple[str, float, Callable[[httpx.Client], httpx.Response]]] = [
        ("upload", 10, upload),
        ("list", 15, lambda h: h.get("/datastore/", params={"output": "all"})),
        ("stats", 5, lambda h: h.get("/datastore/", params={"output": "stats"})),
        ("info", 5, lambda h: h.get("/info/")),
        ("next-sample", 15, lambda h: h.post("/activelearning/random", json={"client_id": client_id})),
        (
            "infer",
            4,
            lambda h: h.post(
                "/infer/segmentation", params={"image": rng.choice(SAMPLES), "output": "json"}, data={"params": "{}"}
            ),
        ),
        ("download", 8, lambda h: h.get("/datastore/image", params={"image": rng.choice(SAMPLES)})),
        ("save-label", 12, save_label),
        ("update-info", 12, update_info),
        ("hostile", 6, lambda h: rng.choice(hostile)[1](h)),
    ]
    names = [op[0] for op in ops]
    weights = [op[1] for op in ops]
    calls = {op[0]: op[2] for op in ops}
    with httpx.Client(base_url=url, timeout=120) as http:
        while time.monotonic() < until:
            op = rng.choices(names, weights)[0]
            start = time.monotonic()
            try:
                answer = calls[op](http)
            except httpx.TimeoutException as error:
                tally.add(op, "timeout", time.monotonic() - start, False, repr(error))
                continue
            except httpx.HTTPError as error:
                tally.add(op, f"error:{type(error).__name__}", time.monotonic() - start, False, repr(error))
                time.sleep(0.5)
                continue
            took = time.monotonic() - start
            code = answer.status_code
            ok = 400 <= code < 500 if op == "hostile" else code < 400
            tally.add(op, str(code), took, ok, "" if ok else answer.text)


# -- memory --------------------------------------------------------------------------------


def sample_rss(stack: Stack) -> dict[str, dict[str, float]]:
    """RSS in MiB per role (the process itself) and, where it has some, of its own child processes."""
    found: dict[str, dict[str, float]] = {}
    for role, process in stack.processes().items():
        try:
            found[role] = {"pid": process.pid, "rss_mib": process.memory_info().rss / 2**20}
            if role == "labelgrid-up":
                continue
            workers = process.children(recursive=True)
            if workers:
                found[f"{role}+workers"] = {
                    "pid": process.pid,
                    "rss_mib": sum(w.memory_info().rss for w in workers) / 2**20,
                }
        except psutil.Error:
            continue
    return found


def run_fsck(studies: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "services.datastore", "fsck", "--root", str(studies), "--min-age", "0"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
    )  # fmt: skip
    return {"returncode": done.returncode, "output": (done.stdout + done.stderr)[-4000:]}


# -- report --------------------------------------------------------------------------------


def rss_table(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    per_role: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for sample in samples:
        for role, value in sample["rss"].items():
            per_role[role].append((int(value["pid"]), value["rss_mib"]))
    table = {}
    for role, values in per_role.items():
        rss = [v for _, v in values]
        table[role] = {
            "first_mib": rss[0], "last_mib": rss[-1], "max_mib": max(rss),
            "growth_mib": rss[-1] - rss[0], "pids": len({pid for pid, _ in values}),
        }  # fmt: skip
    return table


def print_report(result: dict[str, Any]) -> None:
    print(f"\nsoak: {result['seconds']:.0f} s, {result['workers']} workers, {result['requests']} requests, "
          f"{len(result['samples'])} RSS samples")  # fmt: skip
    print(f"\n{'process':<24}{'first MiB':>10}{'last MiB':>10}{'max MiB':>10}{'growth':>9}{'pids':>6}")
    for role, row in sorted(result["rss"].items()):
        print(f"{role:<24}{row['first_mib']:>10.0f}{row['last_mib']:>10.0f}{row['max_mib']:>10.0f}"
              f"{row['growth_mib']:>+9.0f}{row['pids']:>6}")  # fmt: skip
    print(f"\n{'operation':<14}{'count':>7}{'p50 ms':>9}{'p95 ms':>9}  statuses")
    for op, row in sorted(result["operations"].items()):
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(row["statuses"].items()))
        print(f"{op:<14}{row['count']:>7}{row['p50_ms']:>9.0f}{row['p95_ms']:>9.0f}  {statuses}")
    print(f"\nerrors (5xx, timeouts, connection errors, a 4xx to a valid request, a non-4xx to a hostile one): "
          f"{result['errors']} {result['errors_by_status']}")  # fmt: skip
    for line in result["unexpected"][:10]:
        print(f"  {line}")
    print(f"restarts of a service (seen as a new pid): {result['restarts']}")
    print(f"fsck after the stack stopped: exit {result['fsck']['returncode']}: "
          f"{result['fsck']['output'].strip().splitlines()[-1:] }")  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def soak(seconds: float, workers: int, sample_seconds: float, work: Path, seed: int) -> dict[str, Any]:
    stack = start_stack(work, timeout=600)
    tally = Tally()
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        samples.append({"t": 0.0, "rss": sample_rss(stack)})
        data = np.zeros((32, 32, 32), dtype=np.uint8)
        data[8:24, 8:24, 8:24] = 1
        label = nifti_bytes(data)
        image = nifti_bytes(np.random.default_rng(seed).integers(0, 200, (32, 32, 32)).astype(np.int16))
        # Labels must fit the images they are saved on: the sample studies' own shape.
        sample_label = next((stack.studies / "labels" / "final").glob("*.nii.gz"), None)
        if sample_label is not None:
            label = sample_label.read_bytes()
        until = started + seconds
        threads = [
            threading.Thread(target=worker, args=(n, stack.url, until, tally, image, label, seed), daemon=True)
            for n in range(workers)
        ]
        for thread in threads:
            thread.start()
        while time.monotonic() < until:
            time.sleep(max(0.0, min(sample_seconds, until - time.monotonic())))
            samples.append({"t": time.monotonic() - started, "rss": sample_rss(stack)})
        for thread in threads:
            thread.join(180)
    finally:
        stop_code = stop_stack(stack)
    operations = {}
    for op, statuses in tally.statuses.items():
        times = tally.seconds[op]
        operations[op] = {
            "count": sum(statuses.values()), "statuses": dict(statuses),
            "p50_ms": 1000 * statistics.median(times), "p95_ms": 1000 * percentile(times, 0.95),
        }  # fmt: skip
    table = rss_table(samples)
    return {
        "seconds": time.monotonic() - started,
        "workers": workers,
        "requests": sum(op["count"] for op in operations.values()),
        "rss": table,
        "samples": samples,
        "operations": operations,
        "errors": sum(tally.errors.values()),
        "errors_by_status": dict(tally.errors),
        "unexpected": tally.unexpected,
        "restarts": {role: row["pids"] - 1 for role, row in table.items() if row["pids"] > 1},
        "restart_lines": [line.strip() for line in stack.output if re.search(r"exited with code", line)],
        "stack_exit": stop_code,
        "fsck": run_fsck(stack.studies),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=None, help="instead of --minutes (a quick check)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--sample-seconds", type=float, default=60.0, help="RSS sampling interval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    sample_seconds = min(args.sample_seconds, max(1.0, seconds / 4))
    with tempfile.TemporaryDirectory(prefix="labelgrid-soak-") as work:
        try:
            result = soak(seconds, args.workers, sample_seconds, Path(work), args.seed)
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 1
    print_report(result)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"soak-{args.tag or time.strftime('%Y%m%d-%H%M%S')}.json"
    (args.out / name).write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
