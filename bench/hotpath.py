"""Where a hot read's time goes: the same GET through Envoy, on the gateway's own port, from
MONAI Label, and from a server that only replays canned bytes; with httpx and a raw socket.

    python -m bench.hotpath [--images 1000] [--requests 300] [--rounds 3] [--monailabel]
                            [--before SRC] [--out bench/results/hotpath.json]

Serves a generated studies folder with `labelgrid up` (bench.compare's servers) and times,
from keep-alive clients, each hot read (all answered from what the gateway keeps, see
gateway.changes) and two floors: GET /docs (a static page: no backend call) and GET /nope
(a 404: routing only). Targets, interleaved call by call (so load hits them alike):

- labelgrid through Envoy (what clients use) and on the gateway's own port;
- with --before SRC, a second `labelgrid up` from another tree (e.g. `git archive` of an
  older commit), through its Envoy: before / after in one run;
- with --monailabel, MONAI Label 0.8.5 (bench/.venv-monailabel) on a copy of the studies;
- the floor: a Python asyncio server that answers every request with the bytes labelgrid
  sent for GET /datastore/ (status line, headers, body) and does nothing else, directly and
  behind an Envoy with labelgrid's own config (gateway.envoy.bootstrap).

Each target is timed with httpx (the client bench.compare uses for both systems), with a
raw socket (one `sendall` of a fixed request, `recv` until the body is in), and with MONAI
Label's own Python client, which 3D Slicer's plugin ships (a new connection per call), so

    client = httpx - raw;   Envoy hop = raw via Envoy - raw direct;   server = raw - raw canned.

Prints p50 / p95 per path, target and client (medians over rounds, and each round's p50),
the breakdown, and writes JSON. With --poll N, then also GET /info/ N times every
--poll-interval seconds (Slicer polls it every 5 s while training): whether a caller that
comes after the kept parts' TTL waits on the services. --src runs labelgrid from another
tree. Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from monailabel.client.client import MONAILabelUtils

from bench.compare import LABELGRID_APP, ROOT, ensure_monailabel, monailabel_server, percentile, serve, write_studies
from gateway.envoy import EnvoySettings, envoy_command, write_bootstrap
from tests.ports import free_ports

PATHS = {
    "GET /datastore/ (stats)": "/datastore/",
    "GET /info/": "/info/",
    "GET /datastore/?output=all": "/datastore/?output=all",
    "GET /docs (static)": "/docs",
    "GET /nope (404: routing only)": "/nope",
}
STATS = "GET /datastore/ (stats)"
CLIENTS = ("httpx", "raw", "monailabel")
CLIENT_NAMES = {
    "httpx": "httpx",
    "raw": "raw socket",
    "monailabel": "MONAI Label's client (a connection per call)",
}
LABELGRID, GATEWAY_PORT = "labelgrid, through Envoy", "labelgrid, gateway port"
BEFORE, BEFORE_PORT = "labelgrid --before, through Envoy", "labelgrid --before, gateway port"
MONAI_LABEL = "MONAI Label 0.8.5"
CANNED, CANNED_ENVOY = "canned bytes", "canned bytes, through Envoy"

# The floor server: answers each request (headers up to the blank line; the GETs have no body)
# with the same bytes, from one asyncio Protocol (on uvloop where installed).
CANNED_SERVER = r"""
import asyncio, sys
ANSWER = open(sys.argv[2], "rb").read()
class Canned(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(ANSWER)
async def main():
    server = await asyncio.get_running_loop().create_server(Canned, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
try:
    import uvloop
    uvloop.install()
except ImportError:
    pass
asyncio.run(main())
"""


class RawClient:
    """HTTP/1.1 GETs on one keep-alive socket, with as little client code as a call can have:
    one fixed request, and the answer read up to its Content-Length."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.host = parts.netloc.encode()
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def get(self, path: str) -> bytes:
        """The whole answer (status line, headers, body)."""
        sock = self.sock = self.sock or self._connect()
        sock.sendall(b"GET %s HTTP/1.1\r\nhost: %s\r\naccept: */*\r\n\r\n" % (path.encode(), self.host))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by {self.address} before the headers")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length:")), None)
        if length is None:
            raise ValueError(f"no content-length from {self.address} for {path}: {head[:200]!r}")
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by {self.address} mid-body")
            body += chunk
        if b"connection: close" in lines:
            sock.close()
            self.sock = None
        return head + b"\r\n\r\n" + body

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def monailabel_client_get(url: str, path: str) -> bytes:
    """GET as MONAI Label's own Python client sends it (monailabel.client, which 3D Slicer's
    plugin ships): MONAILabelUtils.http_method, a new http.client connection for every call."""
    status, body, _, _ = MONAILabelUtils.http_method("GET", url, path)
    if status >= 500:
        raise RuntimeError(f"GET {path} answered {status}")
    return bytes(body)


def labelgrid(studies: Path, work: Path, src: Path | None = None) -> tuple[Any, str, str]:
    """`labelgrid up` on `studies` (from tree `src`); (server, Envoy's URL, the gateway's URL)."""
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


@contextlib.contextmanager
def canned_servers(answer: bytes, work: Path) -> Iterator[dict[str, str]]:
    """The floor: the canned-bytes server, and an Envoy with labelgrid's config in front of it."""
    server_port, envoy_port, admin_port = free_ports(3)
    (work / "answer.bin").write_bytes(answer)
    (work / "canned.py").write_text(CANNED_SERVER)
    config = write_bootstrap(
        EnvoySettings(port=envoy_port, admin_port=admin_port, gateway_address=f"127.0.0.1:{server_port}"),
        work / "canned-envoy.json",
    )
    procs = [
        subprocess.Popen([sys.executable, str(work / "canned.py"), str(server_port), str(work / "answer.bin")]),
        subprocess.Popen(envoy_command(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    urls = {CANNED: f"http://127.0.0.1:{server_port}", CANNED_ENVOY: f"http://127.0.0.1:{envoy_port}"}
    try:
        for url in urls.values():
            _wait_answering(url, procs)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_answering(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/datastore/", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or any(proc.poll() is not None for proc in procs):
            raise RuntimeError(f"the floor server at {url} did not answer")
        time.sleep(0.1)  # polling a child process that is starting


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


def one_round(targets: dict[str, str], n: int) -> dict[str, Any]:
    """{path name: {target: {client: {p50_ms, p95_ms}}}}; the canned targets for STATS only."""
    out: dict[str, Any] = {}
    https = {name: httpx.Client(base_url=url, timeout=60) for name, url in targets.items()}
    raws = {name: RawClient(url) for name, url in targets.items()}
    try:
        for name, path in PATHS.items():
            here = [t for t in targets if name == STATS or t not in (CANNED, CANNED_ENVOY)]
            calls = [(t, c) for t in here for c in CLIENTS]
            times: dict[tuple[str, str], list[float]] = {call: [] for call in calls}

            def call(target: str, client: str, path: str = path) -> None:
                if client == "httpx":
                    https[target].get(path)
                elif client == "raw":
                    raws[target].get(path)
                else:
                    monailabel_client_get(targets[target], path)

            for _ in range(5):  # warm-up: connections, kept answers
                for target, client in calls:
                    call(target, client)
            for _ in range(n):
                for target, client in calls:
                    start = time.perf_counter()
                    call(target, client)
                    times[target, client].append(time.perf_counter() - start)
            out[name] = {
                target: {
                    client: {
                        "p50_ms": 1000 * statistics.median(times[target, client]),
                        "p95_ms": 1000 * percentile(times[target, client], 0.95),
                    }
                    for client in CLIENTS
                }
                for target in here
            }
    finally:
        for http in https.values():
            http.close()
        for raw in raws.values():
            raw.close()
    return out


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        name: {
            target: {
                client: {q: statistics.median(r[name][target][client][q] for r in rounds) for q in ("p50_ms", "p95_ms")}
                for client in CLIENTS
            }
            for target in rounds[0][name]
        }
        for name in rounds[0]
    }


def report(images: int, rounds: list[dict[str, Any]], mid: dict[str, Any]) -> None:
    heads = " | ".join(f"{CLIENT_NAMES[client]} p50 / p95" for client in CLIENTS)
    print(f"| path ({images:,} images) | target | {heads} | p50 per round: {'; '.join(CLIENTS)} |")
    print("|---|---|" + "---|" * (len(CLIENTS) + 1))
    for name, targets in mid.items():
        for target, row in targets.items():
            spread = "; ".join(
                ", ".join(f"{r[name][target][client]['p50_ms']:.3f}" for r in rounds) for client in CLIENTS
            )
            cells = " | ".join(f"{row[c]['p50_ms']:.3f} / {row[c]['p95_ms']:.3f} ms" for c in CLIENTS)
            print(f"| {name} | {target} | {cells} | {spread} |")
    stats = mid[STATS]

    def p50(target: str, client: str) -> float:
        return float(stats[target][client]["p50_ms"])

    print(f"\n{STATS}, p50 medians (ms):")
    print(f"  client, httpx - raw socket (canned bytes, direct):  {p50(CANNED, 'httpx') - p50(CANNED, 'raw'):.3f}")
    print(f"  Envoy hop, raw (canned bytes via Envoy - direct):    {p50(CANNED_ENVOY, 'raw') - p50(CANNED, 'raw'):.3f}")
    print(
        f"  Envoy hop, raw (labelgrid via Envoy - gateway port): {p50(LABELGRID, 'raw') - p50(GATEWAY_PORT, 'raw'):.3f}"
    )
    print(f"  gateway, raw (gateway port - canned bytes direct):   {p50(GATEWAY_PORT, 'raw') - p50(CANNED, 'raw'):.3f}")
    if BEFORE in stats:
        for client in CLIENTS:
            print(f"  gateway port / --before's, {client}: {p50(GATEWAY_PORT, client) / p50(BEFORE_PORT, client):.2f}")
    for other in (BEFORE, MONAI_LABEL):
        if other in stats:
            for client in CLIENTS:
                floor = p50(CANNED_ENVOY, client) / p50(other, client)
                print(
                    f"  labelgrid through Envoy / {other}, {client}: {p50(LABELGRID, client) / p50(other, client):.2f} "
                    f"(the canned bytes through Envoy: {floor:.2f})"
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hotpath.json")
    parser.add_argument("--poll", type=int, default=0, help="GET /info/ this many times, every --poll-interval s")
    parser.add_argument("--poll-interval", type=float, default=5.5)
    parser.add_argument("--src", type=Path, default=None, help="run labelgrid from this source tree")
    parser.add_argument("--before", type=Path, default=None, help="also a labelgrid from this tree (interleaved)")
    parser.add_argument("--monailabel", action="store_true", help="also MONAI Label 0.8.5 (interleaved)")
    args = parser.parse_args(argv)
    rounds = []
    exe = ensure_monailabel() if args.monailabel else None
    with tempfile.TemporaryDirectory(prefix="lg-hotpath-") as tmp, contextlib.ExitStack() as stack:
        base = Path(tmp)
        write_studies(base / "studies", args.images)
        targets: dict[str, str] = {}
        systems = [("now", LABELGRID, args.src)] + ([("before", BEFORE, args.before)] if args.before else [])
        for label, target, src in systems:
            shutil.copytree(base / "studies", base / label / "studies")
            server, envoy, gateway = labelgrid(base / label / "studies", base / label, src)
            stack.enter_context(server)
            targets[target] = envoy
            targets[GATEWAY_PORT if target == LABELGRID else BEFORE_PORT] = gateway
        if exe is not None:
            shutil.copytree(base / "studies", base / "monailabel" / "studies")
            targets[MONAI_LABEL] = stack.enter_context(
                monailabel_server(exe, base / "monailabel" / "studies", base / "monailabel")
            )
        answer = RawClient(targets[GATEWAY_PORT])
        canned = answer.get(PATHS[STATS])
        answer.close()
        targets.update(stack.enter_context(canned_servers(canned, base)))
        for _ in range(args.rounds):
            rounds.append(one_round(targets, args.requests))
        polled = poll_info(targets[LABELGRID], args.poll, args.poll_interval) if args.poll else None
    mid = medians(rounds)
    report(args.images, rounds, mid)
    for path, row in (polled or {}).items():
        print(
            f"GET {path} every {args.poll_interval:g} s, {args.poll} calls: "
            f"p50 {row['p50_ms']:.2f} ms, max {row['max_ms']:.2f} ms"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"images": args.images, "targets": list(targets), "rounds": rounds, "medians": mid, "polled_info": polled}
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
