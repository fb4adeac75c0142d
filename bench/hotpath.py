"""Where a hot read's time goes: the same GET through Envoy and straight to the gateway.

    python -m bench.hotpath [--images 1000] [--requests 300] [--rounds 3] [--out bench/results/hotpath.json]

Serves a generated studies folder with `labelgrid up` (bench.compare's servers) and times,
from one keep-alive client, each hot read (all answered from what the gateway keeps, see
gateway.changes) and two floors: GET /docs (a static page: no backend call) and
GET /metrics-free 404 (FastAPI's routing only). Each path is timed through Envoy (what
clients use) and on the gateway's own port, interleaved call by call, so

    Envoy hop = through Envoy - gateway port;   gateway = gateway port - 404 floor.

Prints p50 / p95 per path and hop, the medians over rounds, and writes JSON.
With --poll N, then also GET /info/ N times every --poll-interval seconds (Slicer polls it
every 5 s while training): whether a caller that comes after the kept parts' TTL waits on the
services. --src runs labelgrid from another tree (e.g. `git archive` of an older commit).
Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.compare import LABELGRID_APP, ROOT, percentile, serve, write_studies
from tests.ports import free_ports

PATHS = {
    "GET /datastore/ (stats)": "/datastore/",
    "GET /info/": "/info/",
    "GET /datastore/?output=all": "/datastore/?output=all",
    "GET /docs (static)": "/docs",
    "GET /nope (404: routing only)": "/nope",
}


def labelgrid(studies: Path, work: Path, src: Path | None = None) -> tuple[Any, str, str]:
    flags = ["--port", "--admin-port", "--gateway-port", "--datastore-port", "--inference-port",
             "--training-port", "--activelearning-port"]  # fmt: skip
    ports = free_ports(len(flags))
    argv = [
        sys.executable, "-m", "gateway.cli", "up", "--studies", str(studies), "--work-dir", str(work / "var"),
        "--device", "cpu", "--train-device", "cpu", "--scoring-device", "cpu", "--app", LABELGRID_APP,
    ]  # fmt: skip
    for flag, port in zip(flags, ports, strict=True):
        argv += [flag, str(port)]
    envoy, gateway = f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[2]}"
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), str(src / "protos" / "gen" / "python")])
    return serve(argv, envoy, work / "labelgrid.log", env, timeout=600, cwd=src or ROOT), envoy, gateway


def poll_info(envoy: str, n: int, interval: float) -> dict[str, Any]:
    """GET /info/ every `interval` seconds, `n` times (after one call that fills what is kept),
    and GET /docs likewise on its own connection (the floor after the same idle time)."""
    times: dict[str, list[float]] = {"/info/": [], "/docs": []}
    with httpx.Client(base_url=envoy, timeout=60) as info, httpx.Client(base_url=envoy, timeout=60) as docs:
        info.get("/info/").raise_for_status()
        docs.get("/docs").raise_for_status()
        for _ in range(n):
            time.sleep(interval)  # the client's polling period, not a wait for the server
            for path, http in (("/info/", info), ("/docs", docs)):
                start = time.perf_counter()
                http.get(path).raise_for_status()
                times[path].append(time.perf_counter() - start)
    return {
        path: {"p50_ms": 1000 * statistics.median(v), "max_ms": 1000 * max(v), "calls": n} for path, v in times.items()
    }


def one_round(envoy: str, gateway: str, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with httpx.Client(base_url=envoy, timeout=60) as via_envoy, httpx.Client(base_url=gateway, timeout=60) as direct:
        for name, path in PATHS.items():
            times: dict[str, list[float]] = {"envoy": [], "gateway": []}
            for client in (via_envoy, direct) * 5:  # warm-up: connections, kept answers
                client.get(path)
            for _ in range(n):
                for key, client in (("envoy", via_envoy), ("gateway", direct)):
                    start = time.perf_counter()
                    client.get(path)
                    times[key].append(time.perf_counter() - start)
            out[name] = {
                key: {"p50_ms": 1000 * statistics.median(v), "p95_ms": 1000 * percentile(v, 0.95)}
                for key, v in times.items()
            }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hotpath.json")
    parser.add_argument("--poll", type=int, default=0, help="GET /info/ this many times, every --poll-interval s")
    parser.add_argument("--poll-interval", type=float, default=5.5)
    parser.add_argument("--src", type=Path, default=None, help="run labelgrid from this source tree")
    args = parser.parse_args(argv)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="lg-hotpath-") as tmp:
        base = Path(tmp)
        write_studies(base / "studies", args.images)
        server, envoy, gateway = labelgrid(base / "studies", base, args.src)
        polled: dict[str, Any] | None = None
        with server:
            for _ in range(args.rounds):
                rounds.append(one_round(envoy, gateway, args.requests))
            if args.poll:
                polled = poll_info(envoy, args.poll, args.poll_interval)
    print(f"| path ({args.images:,} images) | through Envoy p50 / p95 | gateway port p50 / p95 | Envoy hop (p50) |")
    print("|---|---|---|---|")
    medians: dict[str, Any] = {}
    for name in PATHS:
        m = {
            key: {q: statistics.median(r[name][key][q] for r in rounds) for q in ("p50_ms", "p95_ms")}
            for key in ("envoy", "gateway")
        }
        medians[name] = m
        hop = m["envoy"]["p50_ms"] - m["gateway"]["p50_ms"]
        print(
            f"| {name} | {m['envoy']['p50_ms']:.2f} / {m['envoy']['p95_ms']:.2f} ms "
            f"| {m['gateway']['p50_ms']:.2f} / {m['gateway']['p95_ms']:.2f} ms | {hop:.2f} ms |"
        )
    for path, row in (polled or {}).items():
        print(
            f"GET {path} every {args.poll_interval:g} s, {args.poll} calls: "
            f"p50 {row['p50_ms']:.2f} ms, max {row['max_ms']:.2f} ms"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"images": args.images, "rounds": rounds, "medians": medians, "polled_info": polled}
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
