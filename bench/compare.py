"""labelgrid next to MONAI Label 0.8.5: the read paths annotators hit, one server at a time.

    python -m bench.compare [--counts 1000,10000] [--rounds 3] [--requests 50]
                            [--annotators 10] [--next-samples 10] [--infer-sizes 96,160]
                            [--infer-runs 5,3] [--out bench/results]

1. Installs MONAI Label 0.8.5 into its own venv, bench/.venv-monailabel (once; not part of
   `make test`): torch 2.13.0 (the local CPU wheel), pydicom 2.4.4, pynetdicom < 3,
   dicomweb-client < 0.60, then torchvision removed (its wheel does not match that torch).
2. For each image count: writes a studies folder (small generated NIfTI volumes, every
   fifth with a final label), then serves a fresh copy of it with MONAI Label
   (`monailabel start_server`, the app in bench/monailabel_app: the same 3D UNet as
   labelgrid's sample segmentation model and MONAI Label's random / first strategies), and
   another fresh copy with `labelgrid up`.
3. Drives both with the same client: GET /datastore/?output=all, GET /datastore/ and
   GET /info/ (median and p95 of --requests calls after a warm-up), the listing right after
   an info change, a final label saved on an unlabeled image (PUT /datastore/label, as Slicer
   saves a correction; each read back), then next sample (POST /activelearning/random) from
   --annotators concurrent annotators.
   At the first count also the infer rows: POST /infer/segmentation on generated volumes of
   each --infer-sizes (uploaded through PUT /datastore/image first), and, interleaved with
   labelgrid's calls, the same network run bare in this process (bench.infer.BareModel on
   bench/labelgrid_app, which labelgrid serves here: MONAI Label's app's network, read ->
   transforms -> sliding window 96³ -> label file, no service around it),
   so the table shows REST latency ÷ bare for both servers.
4. Prints the table with labelgrid ÷ MONAI Label and writes the numbers as JSON under --out.

Numbers, not assertions: the tests check behaviour; this says how fast.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np

from tests.ports import free_ports

ROOT = Path(__file__).resolve().parent.parent
ML_VENV = ROOT / "bench" / ".venv-monailabel"
ML_APP = ROOT / "bench" / "monailabel_app"
LABELGRID_APP = "bench.labelgrid_app"  # bench/monailabel_app's network, served by labelgrid
ML_CONSTRAINTS = ["torch==2.13.0", "pydicom==2.4.4", "pynetdicom<3", "dicomweb-client<0.60"]
READ_PATHS = {
    "GET /datastore/?output=all": "/datastore/?output=all",
    "GET /datastore/ (stats)": "/datastore/",
    "GET /info/": "/info/",
    # No backend call on either server: the floor of the HTTP stack (labelgrid: Envoy + FastAPI).
    "GET /docs (floor: no backend call)": "/docs",
}


# -- MONAI Label's venv ------------------------------------------------------------------


def ensure_monailabel() -> Path:
    """bench/.venv-monailabel with monailabel 0.8.5 (installed once); returns its `monailabel`."""
    exe = ML_VENV / "bin" / "monailabel"
    if exe.exists():
        return exe
    print(f"installing MONAI Label 0.8.5 into {ML_VENV} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(ML_VENV)], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(ML_CONSTRAINTS) + "\n")
    env = {**os.environ, "PIP_CONSTRAINT": handle.name, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [str(ML_VENV / "bin" / "python"), "-m", "pip"]
    try:
        subprocess.run([*pip, "install", "--quiet", "monailabel==0.8.5"], check=True, env=env)
        subprocess.run([*pip, "uninstall", "--yes", "--quiet", "torchvision"], check=True, env=env)
    finally:
        os.unlink(handle.name)
    return exe


# -- studies -------------------------------------------------------------------------------


def _nifti(array: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, np.eye(4)).to_bytes(), 1)


def write_studies(folder: Path, count: int) -> None:
    """`count` small volumes in MONAI Label's studies layout, every fifth with a final label."""
    rng = np.random.default_rng(0)
    image = _nifti(rng.integers(0, 255, (16, 16, 16), dtype=np.uint8))
    label = _nifti(rng.integers(0, 3, (16, 16, 16)).astype(np.uint8))
    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for n in range(count):
        (folder / f"img_{n:06d}.nii.gz").write_bytes(image)
        if n % 5 == 0:
            (folder / "labels" / "final" / f"img_{n:06d}.nii.gz").write_bytes(label)


# -- servers -------------------------------------------------------------------------------


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    """Until GET /info/ answers 200 with models (both servers answer only once loaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            answer = httpx.get(f"{url}/info/", timeout=30)
            if answer.status_code == 200 and answer.json().get("models"):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@contextmanager
def serve(
    argv: list[str], url: str, log: Path, env: dict[str, str], timeout: float, cwd: Path | None = None
) -> Iterator[str]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        wait_ready(url, proc, timeout, log)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def monailabel_server(exe: Path, studies: Path, work: Path) -> Any:
    (port,) = free_ports(1)
    app = work / "app"  # MONAI Label writes logs/ and model/ into its app folder: serve a copy
    shutil.copytree(
        ML_APP, app, ignore=shutil.ignore_patterns("__pycache__", "logs", "model", "bin", "lib"), dirs_exist_ok=True
    )
    env = {
        **os.environ,
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
        # The `monailabel` script runs `python -m monailabel.main` with the python on PATH.
        "PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(ML_VENV),
    }
    env.pop("PYTHONPATH", None)
    argv = [
        str(exe), "start_server", "--app", str(app), "--studies", str(studies),
        "--host", "127.0.0.1", "--port", str(port), "--log_level", "warning",
    ]  # fmt: skip
    return serve(argv, f"http://127.0.0.1:{port}", work / "monailabel.log", env, timeout=600)


def labelgrid_server(
    studies: Path,
    work: Path,
    src: Path | None = None,
    extra: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Any:
    """`labelgrid up` on `studies` (`extra`: more flags, e.g. `--backend s3 ...`, with `extra_env`)."""
    flags = ["--port", "--admin-port", "--gateway-port", "--datastore-port", "--inference-port",
             "--training-port", "--activelearning-port"]  # fmt: skip
    ports = free_ports(len(flags))
    argv = [
        sys.executable, "-m", "gateway.cli", "up", "--studies", str(studies), "--work-dir", str(work / "var"),
        "--device", "cpu", "--train-device", "cpu", "--scoring-device", "cpu", "--app", LABELGRID_APP,
    ]  # fmt: skip
    for flag, port in zip(flags, ports, strict=True):
        argv += [flag, str(port)]
    argv += extra or []
    env = {**os.environ, **(extra_env or {})}
    if src is not None:  # another checkout (e.g. an older commit, for a before/after table)
        env["PYTHONPATH"] = os.pathsep.join([str(src), str(src / "protos" / "gen" / "python")])
    # `python -m` puts the working directory first on sys.path: run in the tree to measure.
    return serve(argv, f"http://127.0.0.1:{ports[0]}", work / "labelgrid.log", env, timeout=600, cwd=src or ROOT)


# -- the client ----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(call: Callable[[], httpx.Response], n: int) -> dict[str, float]:
    for _ in range(3):  # warm-up (connections, caches)
        call().raise_for_status()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        response = call()
        response.raise_for_status()
        times.append(time.perf_counter() - start)
    return {
        "p50_ms": 1000 * statistics.median(times),
        "p95_ms": 1000 * percentile(times, 0.95),
        "bytes": len(response.content),
    }


def next_samples(url: str, annotators: int, per_annotator: int) -> dict[str, float]:
    """POST /activelearning/random from `annotators` threads at once (one connection each)."""
    times: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(annotators)

    def annotate(n: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            http.post("/activelearning/random", json={"client_id": f"warm{n}"})
            barrier.wait()
            for _ in range(per_annotator):
                start = time.perf_counter()
                answer = http.post("/activelearning/random", json={"client_id": f"annotator{n}"})
                took = time.perf_counter() - start
                with lock:
                    times.append(took) if answer.status_code == 200 else errors.append(answer.text[:200])

    threads = [threading.Thread(target=annotate, args=(n,)) for n in range(annotators)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"next sample failed: {errors[:3]}")
    return {"p50_ms": 1000 * statistics.median(times), "p95_ms": 1000 * percentile(times, 0.95), "calls": len(times)}


def listing_after_change(http: httpx.Client, n: int) -> dict[str, float]:
    """GET /datastore/?output=all right after an image's info changed (what Slicer sees after
    each next sample, which marks the image): no server may answer from an old listing."""
    times = []
    for i in range(n + 3):
        http.put(
            "/datastore/image/info", params={"image": "img_000001"}, data={"info": json.dumps({"bench": i})}
        ).raise_for_status()
        start = time.perf_counter()
        response = http.get("/datastore/?output=all")
        response.raise_for_status()
        if i >= 3:
            times.append(time.perf_counter() - start)
        assert response.json()["objects"]["img_000001"]["image"]["info"]["bench"] == i
    return {
        "p50_ms": 1000 * statistics.median(times),
        "p95_ms": 1000 * percentile(times, 0.95),
        "bytes": len(response.content),
    }


def label_saves(http: httpx.Client, n: int) -> dict[str, float]:
    """PUT /datastore/label: a final label saved as Slicer saves an annotator's correction
    (multipart `label` file + `params`), each on another image, every one read back."""
    label = _nifti(np.random.default_rng(1).integers(0, 3, (16, 16, 16)).astype(np.uint8))
    times = []
    for i in range(n + 3):
        image = f"img_{2 * i + 1:06d}"  # odd ids: no final label yet (write_studies labels every fifth)
        start = time.perf_counter()
        response = http.put(
            "/datastore/label",
            params={"image": image, "tag": "final"},
            data={"params": json.dumps({"label_info": [{"name": "liver", "idx": 1}]})},
            files={"label": (f"{image}.nii.gz", label, "application/octet-stream")},
        )
        took = time.perf_counter() - start
        response.raise_for_status()
        if i >= 3:
            times.append(took)
        saved = http.get("/datastore/label", params={"label": image, "tag": "final"})
        assert saved.status_code == 200 and saved.content == label, (image, saved.status_code)
    return {"p50_ms": 1000 * statistics.median(times), "p95_ms": 1000 * percentile(times, 0.95), "calls": len(times)}


def bare_model(work: Path) -> Any:
    """bench.infer's bare path on LABELGRID_APP's segmentation: the inference service's own
    adapters in this process (read, pre-transforms, sliding window, post, label file, sha256)."""
    from bench.infer import BareModel
    from services.common.apps import load_app
    from services.common.models.torch_runner import TorchRunner
    from services.common.models.volumes import VolumeFiles

    bare = BareModel.__new__(BareModel)
    bare.task = load_app(LABELGRID_APP).infer_tasks["segmentation"]
    bare.runner = TorchRunner(["cpu"], warm_up=True)
    bare.loaded = bare.runner.load(bare.task, "cpu", None, "")
    bare.volumes, bare.work, bare.model_seconds = VolumeFiles(), work, []
    return bare


def infer_rows(url: str, args: argparse.Namespace, volumes: dict[int, Path], bare: Any) -> dict[str, Any]:
    """POST /infer/segmentation per volume size (the image uploaded once through REST);
    with `bare` (labelgrid's rounds), the bare in-process run interleaved call by call."""
    from bench.infer import interleaved  # torch and the sample app: only when infer rows run

    out: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=600) as http:
        for size, path in volumes.items():
            with path.open("rb") as handle:
                http.put(
                    "/datastore/image", params={"image": f"bench_{size}"}, files={"file": (path.name, handle)}
                ).raise_for_status()
        for (size, path), runs in zip(volumes.items(), args.infer_run_counts, strict=True):

            def rest(size: int = size) -> None:
                response = http.post("/infer/segmentation", params={"image": f"bench_{size}"}, data={"params": "{}"})
                response.raise_for_status()

            calls: dict[str, Callable[[], Any]] = {"rest": rest}
            if bare is not None:
                calls["bare"] = functools.partial(bare, path)
            times = interleaved(calls, runs)
            for name, values in times.items():
                row = f"infer {size}³ " + (
                    "REST" if name == "rest" else "bare in-process (same network, sliding window)"
                )
                out[row] = {
                    "p50_ms": 1000 * statistics.median(values),
                    "p95_ms": 1000 * percentile(values, 0.95),
                    "calls": len(values),
                }
    return out


def measure(url: str, args: argparse.Namespace, infer: tuple[dict[int, Path], Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=120) as http:
        for name, path in READ_PATHS.items():
            out[name] = timed(functools.partial(http.get, path), args.requests)
        out["GET /datastore/?output=all after an info change"] = listing_after_change(http, max(5, args.requests // 5))
        out["PUT /datastore/label (save a final label)"] = label_saves(http, max(5, args.requests // 5))
    out[f"next sample, {args.annotators} annotators"] = next_samples(url, args.annotators, args.next_samples)
    if infer is not None:
        out.update(infer_rows(url, args, *infer))
    return out


# -- the table -----------------------------------------------------------------------------


def median_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for row in rounds[0]:
        merged[row] = {k: statistics.median(r[row][k] for r in rounds) for k in rounds[0][row]}
    return merged


def _ms(row: dict[str, Any] | None) -> str:
    return "–" if row is None else f"{row['p50_ms']:.2f} / {row['p95_ms']:.2f} ms"


def spread(rounds: list[dict[str, Any]], row: str) -> str:
    """The rounds' p50s of `row`, lowest to highest (how much the shared machine moved them)."""
    values = sorted(r[row]["p50_ms"] for r in rounds if row in r)
    if not values:
        return "–"
    return f"{values[0]:.2f}–{values[-1]:.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(
    count: int,
    ml: dict[str, Any],
    lg: dict[str, Any],
    rounds: dict[str, list[dict[str, Any]]] | None = None,
) -> str:
    """Medians of the rounds (p50 / p95), the ratio of p50s, and each system's p50 spread over rounds."""
    rounds = rounds or {}
    lines = [
        f"| what ({count:,} images) | MONAI Label p50 / p95 | labelgrid p50 / p95 "
        "| labelgrid ÷ MONAI Label (p50) | p50 over rounds, ms: MONAI Label; labelgrid |",
        "|---|---|---|---|---|",
    ]
    for row in dict.fromkeys([*ml, *lg]):
        a, b = ml.get(row), lg.get(row)
        ratio = f"{b['p50_ms'] / a['p50_ms']:.2f}" if a and b else "–"
        spreads = f"{spread(rounds.get('monailabel', []), row)}; {spread(rounds.get('labelgrid', []), row)}"
        lines.append(f"| {row} | {_ms(a)} | {_ms(b)} | {ratio} | {spreads} |")
    # REST ÷ bare: what each server adds around the same forward pass (labelgrid's limit: 1.05).
    for row, bare in lg.items():
        if "bare in-process" not in row:
            continue
        rest_row = row.split(" bare ")[0] + " REST"
        parts = [
            f"{name} {rows[rest_row]['p50_ms'] / bare['p50_ms']:.2f}"
            for name, rows in (("MONAI Label", ml), ("labelgrid", lg))
            if rest_row in rows
        ]
        lines.append(f"| {rest_row} ÷ bare (p50) | | | {', '.join(parts)} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,10000", help="image counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per system (medians are reported)")
    parser.add_argument("--requests", type=int, default=50, help="timed calls per read path and round")
    parser.add_argument("--annotators", type=int, default=10, help="concurrent next-sample clients")
    parser.add_argument("--next-samples", type=int, default=10, help="next-sample calls per annotator")
    parser.add_argument(
        "--infer-sizes", default="96,160", help="volume sizes of the infer rows (first count only); empty: none"
    )
    parser.add_argument("--infer-runs", default="5,3", help="timed infers per size, system and round")
    parser.add_argument("--systems", default="monailabel,labelgrid")
    parser.add_argument(
        "--monailabel-max",
        type=int,
        default=10_000,
        help="counts above this run labelgrid only (MONAI Label's JSON datastore is O(n) per write: "
        "100k images take it too long on this machine)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--labelgrid-src",
        type=Path,
        default=None,
        help="run labelgrid from this source tree (e.g. `git archive` of an older commit)",
    )
    parser.add_argument("--tag", default="", help="suffix of the JSON file name (e.g. before)")
    args = parser.parse_args(argv)
    systems = args.systems.split(",")
    infer_sizes = [int(s) for s in args.infer_sizes.split(",") if s]
    args.infer_run_counts = [int(r) for r in args.infer_runs.split(",")][: len(infer_sizes)]
    if args.infer_run_counts:
        args.infer_run_counts += [args.infer_run_counts[-1]] * (len(infer_sizes) - len(args.infer_run_counts))
    bare = None
    exe = ensure_monailabel() if "monailabel" in systems else Path()
    args.out.mkdir(parents=True, exist_ok=True)
    for index, count in enumerate(int(c) for c in args.counts.split(",")):
        with tempfile.TemporaryDirectory(prefix="lg-compare-") as tmp:
            base = Path(tmp)
            write_studies(base / "studies", count)
            volumes: dict[int, Path] = {}
            if index == 0 and infer_sizes:
                from bench.infer import volume_file

                (base / "volumes").mkdir()
                volumes = {size: volume_file(size, base / "volumes") for size in infer_sizes}
                bare = bare_model(base / "volumes")
            here = [s for s in systems if s != "monailabel" or count <= args.monailabel_max]
            results: dict[str, list[dict[str, Any]]] = {s: [] for s in here}
            for round_ in range(args.rounds):
                # Alternate which system goes first, so neither always runs on the warmer machine.
                for system in here if round_ % 2 == 0 else here[::-1]:
                    work = base / f"{system}-{round_}"
                    shutil.copytree(base / "studies", work / "studies")
                    for attempt in range(3):  # a server that fails to start is started again
                        start = time.perf_counter()
                        server = (
                            monailabel_server(exe, work / "studies", work)
                            if system == "monailabel"
                            else labelgrid_server(work / "studies", work, args.labelgrid_src)
                        )
                        try:
                            with server as url:
                                ready = time.perf_counter() - start
                                infer = (volumes, bare if system == "labelgrid" else None) if volumes else None
                                result = measure(url, args, infer)
                            break
                        except RuntimeError as err:
                            if attempt == 2 or "server" not in str(err):
                                raise
                            print(f"{system} did not start, starting it again: {str(err)[-300:]}", flush=True)
                    result["ready_s"] = ready
                    results[system].append(result)
                    print(f"{count} images, round {round_ + 1}, {system}: ready in {ready:.1f} s", flush=True)
                    shutil.rmtree(work, ignore_errors=True)
            medians = {
                s: median_rounds([{k: v for k, v in r.items() if k != "ready_s"} for r in results[s]]) for s in here
            }
            print(table(count, medians.get("monailabel", {}), medians.get("labelgrid", {}), results), flush=True)
            path = args.out / f"compare-{count}{'-' + args.tag if args.tag else ''}.json"
            path.write_text(json.dumps({"images": count, "rounds": results, "medians": medians}, indent=2))
            print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
