"""Uploads and downloads through REST: labelgrid next to MONAI Label 0.8.5 and a plain copy.

    python -m bench.transfers [--mib 64] [--repeats 5]
                              [--systems copy,monailabel,labelgrid,minio,labelgrid-s3,labelgrid-s3-streamed,
                                         labelgrid-s3-redirect]
                              [--labelgrid-src DIR] [--tag before] [--out bench/results]

One valid uncompressed NIfTI of --mib MiB is uploaded (PUT /datastore/image, multipart
with `params` before `file`, as MONAI Label's client sends) and downloaded
(GET /datastore/image) --repeats times per system, one server at a time (bench.compare
starts them: `labelgrid up` on the local folder, `monailabel start_server` from
bench/.venv-monailabel when it exists). "copy" is the floor: the same bytes written to a
file in the same folder and fsynced. On S3 (one SeaweedFS, started as the tests start it,
tests/fixtures/seaweedfs.py): "labelgrid-s3" is `labelgrid up --backend s3` through REST (its
Envoy fetches downloads from S3 itself, after the gateway's 307), "labelgrid-s3-streamed" the
same with `?redirect=false` on downloads (streamed by the datastore and the gateway), and
"minio" the floor there: the raw minio SDK putting (fput_object, 16 MiB parts, as
bench/datastore.py) and getting (get_object read to the end) the same file on the same server;
"labelgrid-s3-redirect" is the same with `--s3-public-endpoint` (downloads answered with a 307
to a presigned GET on SeaweedFS, which the client follows).
Prints MiB/s (medians) with the ratios to MONAI Label and, for labelgrid-s3, to the raw SDK
(the median and spread of the round-by-round ratios: each labelgrid round runs right after the
SDK's, so the load of a shared machine mostly cancels out), and writes JSON under --out
("s3_service_vs_raw_rest"). Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import urllib3

from bench.compare import ML_VENV, ROOT, labelgrid_server, monailabel_server, write_studies
from tests.fixtures.seaweedfs import SeaweedS3, run_seaweedfs

MiB = 1024 * 1024


def make_volume(path: Path, mib: int) -> int:
    """A valid uncompressed NIfTI of about `mib` MiB (random uint8); returns its size."""
    side = 256
    depth = max(1, mib * MiB // (side * side))
    data = np.random.default_rng(0).integers(0, 255, (side, side, depth), dtype=np.uint8)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path.stat().st_size


def measure_http(
    url: str,
    volume: Path,
    repeats: int,
    between: Callable[[int], None] = lambda n: None,
    follow_redirects: bool = False,
    download_client: str = "urllib3",
    download_query: str = "",
) -> dict[str, list[float]]:
    """`between(n)` runs before each round (the raw SDK's round, interleaved on S3);
    `download_query` is added to each download's query string.

    Downloads are read with `download_client`: urllib3 (default), the HTTP library of the minio
    SDK, of requests (Slicer, scripts) and close to http.client (MONAI Label's client); or httpx,
    which these numbers used before: its pure-Python HTTP parsing reads ~250 MiB/s at most here,
    about half the SDK's GET even straight from SeaweedFS, so it measured itself.
    """
    size = volume.stat().st_size
    up: list[float] = []
    down: list[float] = []
    pool = urllib3.PoolManager(timeout=300, retries=urllib3.Retry(total=None, connect=0, read=0, status=0, redirect=2))
    with httpx.Client(base_url=url, timeout=300, follow_redirects=follow_redirects) as http:
        for n in range(repeats + 1):  # the first round warms up
            between(n)
            with volume.open("rb") as handle:
                start = time.perf_counter()
                answer = http.put(
                    "/datastore/image",
                    params={"image": f"bench_{n}"},
                    data={"params": json.dumps({"client_id": "bench"})},
                    files={"file": (volume.name, handle, "application/octet-stream")},
                )
                elapsed = time.perf_counter() - start
            answer.raise_for_status()
            if n:
                up.append(size / MiB / elapsed)
            start = time.perf_counter()
            got = 0
            if download_client == "httpx":
                with http.stream("GET", f"/datastore/image?image=bench_{n}{download_query}") as stream:
                    stream.raise_for_status()
                    for block in stream.iter_raw(MiB):
                        got += len(block)
            else:
                response = pool.request(
                    "GET",
                    f"{url}/datastore/image?image=bench_{n}{download_query}",
                    preload_content=False,
                    redirect=follow_redirects,
                )
                try:
                    if response.status != 200:
                        raise RuntimeError(f"GET /datastore/image answered {response.status}")
                    for block in response.stream(MiB):
                        got += len(block)
                finally:
                    response.release_conn()
            elapsed = time.perf_counter() - start
            if got != size:
                raise RuntimeError(f"downloaded {got} bytes of {size}")
            if n:
                down.append(size / MiB / elapsed)
    return {"upload_mib_s": up, "download_mib_s": down}


class RawMinio:
    """The raw SDK on the same server, the floor of any S3 path: one round per call."""

    def __init__(self, s3: SeaweedS3, volume: Path) -> None:
        self.client, self.bucket, self.volume = s3.client(), s3.new_bucket(), volume
        self.client.make_bucket(self.bucket)
        self.result: dict[str, list[float]] = {"upload_mib_s": [], "download_mib_s": []}

    def __call__(self, n: int) -> None:
        client, bucket, volume = self.client, self.bucket, self.volume
        size = volume.stat().st_size
        start = time.perf_counter()
        client.fput_object(bucket, f"bench_{n}", str(volume), part_size=16 * MiB)
        elapsed = time.perf_counter() - start
        if n:
            self.result["upload_mib_s"].append(size / MiB / elapsed)
        start = time.perf_counter()
        response = client.get_object(bucket, f"bench_{n}")
        try:
            got = sum(len(block) for block in response.stream(MiB))
        finally:
            response.close()
            response.release_conn()
        elapsed = time.perf_counter() - start
        if got != size:
            raise RuntimeError(f"downloaded {got} bytes of {size}")
        if n:
            self.result["download_mib_s"].append(size / MiB / elapsed)


def measure_copy(volume: Path, folder: Path, repeats: int) -> dict[str, list[float]]:
    size = volume.stat().st_size
    up: list[float] = []
    down: list[float] = []
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(repeats + 1):
        target = folder / f"copy_{n}.nii"
        start = time.perf_counter()
        with volume.open("rb") as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, MiB)
            out.flush()
            os.fsync(out.fileno())
        elapsed = time.perf_counter() - start
        if n:
            up.append(size / MiB / elapsed)
        start = time.perf_counter()
        with target.open("rb") as src:
            while src.read(MiB):
                pass
        elapsed = time.perf_counter() - start
        if n:
            down.append(size / MiB / elapsed)
    return {"upload_mib_s": up, "download_mib_s": down}


def table(
    mib: int, medians: dict[str, dict[str, float]], paired: dict[str, dict[str, list[float]]] | None = None
) -> str:
    ref = medians.get("monailabel")
    lines = [
        f"| {mib} MiB through REST | upload MiB/s | download MiB/s | upload ÷ MONAI Label | download ÷ MONAI Label |",
        "|---|---|---|---|---|",
    ]
    for system, row in medians.items():
        ratios = (
            (f"{row['upload_mib_s'] / ref['upload_mib_s']:.2f}", f"{row['download_mib_s'] / ref['download_mib_s']:.2f}")
            if ref and system not in S3_SYSTEMS
            else ("–", "–")
        )
        lines.append(
            f"| {system} | {row['upload_mib_s']:.0f} | {row['download_mib_s']:.0f} | {ratios[0]} | {ratios[1]} |"
        )
    for system, rounds in (paired or {}).items():
        up, down = rounds["upload"], rounds["download"]
        lines.append(
            f"| {system} ÷ raw minio SDK through REST, median of {len(up)} paired rounds (min–max) | | "
            f"| {statistics.median(up):.2f} ({min(up):.2f}–{max(up):.2f}) "
            f"| {statistics.median(down):.2f} ({min(down):.2f}–{max(down):.2f}) |"
        )
    return "\n".join(lines)


LABELGRID_S3 = ("labelgrid-s3", "labelgrid-s3-streamed", "labelgrid-s3-redirect")
S3_SYSTEMS = ("minio", *LABELGRID_S3)


def paired_ratios(raw: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, list[float]]] | None:
    """Each of LABELGRID_S3 ÷ raw SDK round by round: each pair ran back to
    back on the same server, so the load of this shared machine mostly cancels out (the
    medians' ratio does not). The SDK rounds paired with each are raw["minio@SYSTEM"]."""
    out = {}
    for system in LABELGRID_S3:
        sdk = raw.get(f"minio@{system}")
        if system not in raw or sdk is None:
            continue
        lg = raw[system]
        out[system] = {
            way: [a / b for a, b in zip(lg[f"{way}_mib_s"], sdk[f"{way}_mib_s"], strict=True)]
            for way in ("upload", "download")
        }
    return out or None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed transfers per system (medians)")
    parser.add_argument("--systems", default="copy,monailabel,labelgrid")
    parser.add_argument("--labelgrid-src", type=Path, default=None, help="run labelgrid from this tree")
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--download-client", choices=("urllib3", "httpx"), default="urllib3", help="HTTP client of the REST downloads"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    exe = ML_VENV / "bin" / "monailabel"
    if "monailabel" in systems and not exe.exists():
        print(f"no {exe}: MONAI Label left out (python -m bench.compare installs it)", flush=True)
        systems.remove("monailabel")
    raw: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="lg-transfers-") as tmp, contextlib.ExitStack() as stack:
        base = Path(tmp)
        volume = base / "volume.nii"
        make_volume(volume, args.mib)
        s3 = stack.enter_context(run_seaweedfs(base / "seaweedfs")) if set(S3_SYSTEMS) & set(systems) else None
        for system in systems:
            work = base / system
            write_studies(work / "studies", 2)
            if system == "copy":
                raw[system] = measure_copy(volume, work / "studies", args.repeats)
                continue
            if system == "minio":
                if not set(LABELGRID_S3) & set(systems):  # else interleaved with them, round by round
                    assert s3 is not None
                    minio = RawMinio(s3, volume)
                    for n in range(args.repeats + 1):
                        minio(n)
                    raw[system] = minio.result
                continue
            if system in LABELGRID_S3:
                assert s3 is not None
                bucket = s3.new_bucket()
                s3.client().make_bucket(bucket)
                # The redirect: clients reach this SeaweedFS at the address the service uses, spelled
                # otherwise (localhost), so that the edge, which follows 307s to the service's own
                # spelling of it, hands this one to the client.
                public_endpoint = "localhost:" + s3.endpoint.rpartition(":")[2]
                public = ["--s3-public-endpoint", public_endpoint] if system == "labelgrid-s3-redirect" else []
                server = labelgrid_server(
                    work / "studies", work, args.labelgrid_src,
                    extra=["--backend", "s3", "--s3-endpoint", s3.endpoint, "--s3-bucket", bucket, *public],
                    extra_env={"LABELGRID_S3_ACCESS_KEY": s3.access_key, "LABELGRID_S3_SECRET_KEY": s3.secret_key},
                )  # fmt: skip
            else:
                server = (
                    monailabel_server(exe, work / "studies", work)
                    if system == "monailabel"
                    else labelgrid_server(work / "studies", work, args.labelgrid_src)
                )
            with server as url:
                if system in LABELGRID_S3 and "minio" in systems:
                    assert s3 is not None
                    minio = RawMinio(s3, volume)
                    raw[system] = measure_http(
                        url,
                        volume,
                        args.repeats,
                        minio,
                        follow_redirects=system == "labelgrid-s3-redirect",
                        download_client=args.download_client,
                        download_query="&redirect=false" if system == "labelgrid-s3-streamed" else "",
                    )
                    raw[f"minio@{system}"] = minio.result
                    raw["minio"] = {k: raw.get("minio", {}).get(k, []) + v for k, v in minio.result.items()}
                else:
                    raw[system] = measure_http(url, volume, args.repeats, download_client=args.download_client)
            shutil.rmtree(work, ignore_errors=True)
    medians = {s: {k: statistics.median(v) for k, v in raw[s].items()} for s in systems if s in raw}
    paired = paired_ratios(raw)
    print(table(args.mib, medians, paired), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"transfers-{args.mib}{'-' + args.tag if args.tag else ''}.json"
    result: dict[str, object] = {
        "mib": args.mib,
        "download_client": args.download_client,
        "medians": medians,
        "raw": raw,
    }
    if paired:
        # labelgrid-s3's ratios as before; the others' under their names.
        stats = {
            system: {
                way: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v}
                for way, v in ratios.items()
            }
            for system, ratios in paired.items()
        }
        result["s3_service_vs_raw_rest"] = stats.pop("labelgrid-s3", {}) | stats
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
