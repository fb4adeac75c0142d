"""Datastore benchmark: the service against the raw minio SDK on the same SeaweedFS.

    python -m bench.datastore [--sizes 64,512] [--rounds 3] [--counts 1000,10000] [--out bench/results/datastore.json]

1. Upload / download throughput of large volumes through the datastore service (gRPC chunk
   streams, s3 backend) vs `minio` put/get straight to the same SeaweedFS, interleaved round by
   round, as service ÷ raw speed ratios (median and spread of the rounds), with the service's
   peak RSS growth while streaming (it must not grow with the payload). Through REST:
   bench/transfers.py --systems minio,labelgrid-s3.
2. ListImages / GetStatus / unlabeled-images latency with 1,000 and 10,000 images, on the
   local and s3 blob backends (SQLite index).
Prints a table and writes JSON. Numbers, not assertions: tests check behaviour.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc
import nibabel as nib
import numpy as np
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as pb
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as pb_grpc

from tests.fixtures.processes import PeakRss, ServiceProcess
from tests.fixtures.seaweedfs import SeaweedS3, run_seaweedfs

MiB = 1024 * 1024
CHUNK = MiB


def nifti_head(total_bytes: int) -> tuple[bytes, int]:
    side = 512
    depth = max(1, total_bytes // (side * side))
    header = nib.Nifti1Header()
    header.set_data_shape((side, side, depth))
    header.set_data_dtype(np.uint8)
    header.set_data_offset(352)
    return header.binaryblock + b"\0" * (352 - len(header.binaryblock)), side * side * depth


def payload(total_bytes: int):
    """(chunks iterator factory, size, sha256) of a valid NIfTI of about total_bytes."""
    head, data_bytes = nifti_head(total_bytes)
    block = np.random.default_rng(0).integers(0, 255, CHUNK, dtype=np.uint8).tobytes()

    def chunks():
        yield head
        sent = 0
        while sent < data_bytes:
            piece = block[: min(CHUNK, data_bytes - sent)]
            sent += len(piece)
            yield piece

    digest = hashlib.sha256()
    for piece in chunks():
        digest.update(piece)
    return chunks, len(head) + data_bytes, digest.hexdigest()


def DatastoreProcess(*args: str) -> ServiceProcess:
    return ServiceProcess("services.datastore", "--metrics-port", "-1", "--log-level", "WARNING", *args)


def grpc_upload(stub, name: str, chunks, sha: str) -> None:
    def requests():
        yield pb.UploadImageRequest(header=pb.UploadImageHeader(image_id=name, file_name=f"{name}.nii"))
        for piece in chunks():
            yield pb.UploadImageRequest(chunk=piece)
        yield pb.UploadImageRequest(finish=common_pb2.UploadFinish(sha256=sha))

    stub.UploadImage(requests())


def grpc_download(stub, name: str) -> int:
    size = 0
    for message in stub.DownloadImage(pb.DownloadImageRequest(name=f"images/{name}")):
        if message.WhichOneof("payload") == "chunk":
            size += len(message.chunk)
    return size


def throughput(s3: SeaweedS3, sizes_mib: list[int], work: Path, rounds: int = 3) -> list[dict]:
    """Per size, `rounds` rounds of: the raw SDK's upload and download, then the service's over
    gRPC, back to back on the same SeaweedFS. Ratios are service ÷ raw speeds (1.0 = as fast as
    the SDK), the median and spread of the round-by-round ratios: on a shared machine the load
    changes between rounds much more than between the two halves of one."""
    client = s3.client()
    raw_bucket = s3.new_bucket()
    client.make_bucket(raw_bucket)
    service = DatastoreProcess(
        "--backend",
        "s3",
        "--s3-endpoint",
        s3.endpoint,
        "--s3-access-key",
        s3.access_key,
        "--s3-secret-key",
        s3.secret_key,
        "--s3-bucket",
        s3.new_bucket(),
        "--state-dir",
        str(work / "state-tp"),
    )
    rows = []
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
        stub = pb_grpc.DatastoreServiceStub(channel)
        stub.GetStatus(pb.GetStatusRequest())
        for size_mib in sizes_mib:
            chunks, size, sha = payload(size_mib * MiB)
            # Raw baseline: what a user with the file on disk does with the SDK.
            source = work / f"raw{size_mib}.nii"
            with source.open("wb") as out:
                for piece in chunks():
                    out.write(piece)
            speeds: dict[str, list[float]] = {k: [] for k in ("raw_up", "raw_down", "svc_up", "svc_down")}
            rss_growth = 0.0
            for n in range(rounds):
                started = time.perf_counter()
                client.fput_object(raw_bucket, source.name, str(source), part_size=16 * MiB)
                speeds["raw_up"].append(size / MiB / (time.perf_counter() - started))
                started = time.perf_counter()
                response = client.get_object(raw_bucket, source.name)
                got = sum(len(piece) for piece in response.stream(CHUNK))
                response.close()
                response.release_conn()
                speeds["raw_down"].append(size / MiB / (time.perf_counter() - started))
                assert got == size

                rss = PeakRss(service.proc.pid)
                started = time.perf_counter()
                grpc_upload(stub, f"svc{size_mib}_{n}", chunks, sha)
                speeds["svc_up"].append(size / MiB / (time.perf_counter() - started))
                started = time.perf_counter()
                assert grpc_download(stub, f"svc{size_mib}_{n}") == size
                speeds["svc_down"].append(size / MiB / (time.perf_counter() - started))
                rss_growth = max(rss_growth, rss.stop() / MiB)
            source.unlink()
            up = [a / b for a, b in zip(speeds["svc_up"], speeds["raw_up"], strict=True)]
            down = [a / b for a, b in zip(speeds["svc_down"], speeds["raw_down"], strict=True)]
            rows.append(
                {
                    "size_mib": size_mib,
                    "rounds": rounds,
                    "raw_upload_mib_s": statistics.median(speeds["raw_up"]),
                    "service_upload_mib_s": statistics.median(speeds["svc_up"]),
                    "upload_service_vs_raw": statistics.median(up),
                    "upload_ratio_min": min(up),
                    "upload_ratio_max": max(up),
                    "raw_download_mib_s": statistics.median(speeds["raw_down"]),
                    "service_download_mib_s": statistics.median(speeds["svc_down"]),
                    "download_service_vs_raw": statistics.median(down),
                    "download_ratio_min": min(down),
                    "download_ratio_max": max(down),
                    "service_rss_growth_mib": rss_growth,
                }
            )
        channel.close()
    finally:
        service.stop()
    return rows


def tiny_nifti() -> bytes:
    return nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)).to_bytes()


def p50_ms(call, repeat: int = 20) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def listing_times(stub: pb_grpc.DatastoreServiceStub, deep_token: str) -> dict[str, float]:
    """Median times of the listing calls at the store's current size."""
    return {
        "list_first_page_ms": p50_ms(partial(stub.ListImages, pb.ListImagesRequest(page_size=100))),
        "list_deep_page_ms": p50_ms(
            partial(stub.ListImages, pb.ListImagesRequest(page_size=100, page_token=deep_token))
        ),
        "status_ms": p50_ms(partial(stub.GetStatus, pb.GetStatusRequest())),
        "unlabeled_first_page_ms": p50_ms(
            partial(stub.ListImages, pb.ListImagesRequest(page_size=100, filter=pb.IMAGE_FILTER_UNLABELED))
        ),
    }


def listing(s3: SeaweedS3, counts: list[int], work: Path) -> list[dict]:
    data = tiny_nifti()
    sha = hashlib.sha256(data).hexdigest()

    def upload_one(stub: pb_grpc.DatastoreServiceStub, n: int) -> None:
        grpc_upload(stub, f"img_{n:06d}", lambda: iter([data]), sha)

    rows = []
    for backend in ("local", "s3"):
        args = [
            "--backend",
            backend,
            "--root",
            str(work / f"studies-{backend}"),
            "--state-dir",
            str(work / f"state-{backend}"),
        ]
        if backend == "s3":
            args += [
                "--s3-endpoint",
                s3.endpoint,
                "--s3-access-key",
                s3.access_key,
                "--s3-secret-key",
                s3.secret_key,
                "--s3-bucket",
                s3.new_bucket(),
            ]
        service = DatastoreProcess(*args)
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
            stub = pb_grpc.DatastoreServiceStub(channel)
            have = 0
            for count in counts:
                started = time.perf_counter()
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(partial(upload_one, stub), range(have, count)))
                fill_s = time.perf_counter() - started
                uploads = count - have
                have = count
                # A page token from deep in the listing: keyset paging must not scan up to it.
                deep_token = stub.ListImages(
                    pb.ListImagesRequest(page_size=min(count - 100, 1000) or 1)
                ).next_page_token
                rows.append(
                    {
                        "backend": backend,
                        "images": count,
                        "uploads_per_s": uploads / fill_s,
                        **listing_times(stub, deep_token),
                    }
                )
            channel.close()
        finally:
            service.stop()
    return rows


def table(rows: list[dict], title: str) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    width = {
        k: max(len(k), *(len(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k])) for r in rows)) for k in keys
    }
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [title, "  ".join(k.rjust(width[k]) for k in keys)]
    lines += ["  ".join(fmt(r[k]).rjust(width[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,512", help="volume sizes in MiB")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved raw/service rounds per size")
    parser.add_argument("--counts", default="1000,10000", help="datastore sizes for the listing benchmark")
    parser.add_argument("--out", type=Path, default=Path("bench/results/datastore.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="labelgrid-bench-") as tmp:
        work = Path(tmp)
        with run_seaweedfs(work / "seaweedfs") as s3:
            transfer = throughput(s3, [int(v) for v in args.sizes.split(",")], work, args.rounds)
            print(
                table(
                    transfer,
                    "throughput over gRPC: datastore service (s3 backend) vs raw minio SDK, same SeaweedFS;"
                    " *_service_vs_raw = service speed / raw speed, median of the rounds' ratios (min, max)",
                )
            )
            counts = [int(v) for v in args.counts.split(",") if v]
            lists = listing(s3, counts, work) if counts else []
            print()
            print(table(lists, "listing latency (p50 of 20 calls, ms), SQLite index"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"cpus": os.cpu_count()}, "throughput": transfer, "listing": lists}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
