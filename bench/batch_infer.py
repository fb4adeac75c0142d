"""Batch inference benchmark: MONAI Label's POST /batch/infer vs one client calling infer in a loop.

    python -m bench.batch_infer [--images 100] [--size 48] [--device auto] [--out bench/results/batch_infer.json]

A `labelgrid up` on free loopback ports (every service its own process, Envoy in front) holds
--images synthetic size³ volumes. Then, on the same images and the same model (`segmentation`),
each result saved as a label in both cases:
  (a) loop: one client calls POST /infer/segmentation?output=json with save_label, image after image
      (what an admin did before batch inference, MONAI Label issue 1192);
  (b) batch: one POST /batch/infer/segmentation?run_sync=true (MONAI Label's answer: a dict of
      each image's saved label); the inference service fans the images out over its device slots.
Prints images/s of both and their ratio, with the devices and the load average, and writes
JSON. Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np

from bench.datastore import table
from services.datastore.sample_studies import synthetic_volume
from tests.ports import free_ports

MODEL = "segmentation"
UP = "labelgrid is up"
PORT_FLAGS = (
    "--port", "--admin-port", "--gateway-port", "--datastore-port", "--inference-port", "--training-port",
    "--activelearning-port",
)  # fmt: skip


def start_stack(work: Path, device: str) -> tuple[subprocess.Popen[str], str]:
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    argv = [
        str(Path(sys.executable).with_name("labelgrid")),
        "up",
        "--studies",
        str(work / "studies"),
        "--work-dir",
        str(work / "var"),
    ]
    argv += ["--device", device]
    for flag, port in ports.items():
        argv += [flag, str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ready = threading.Event()

    def watch() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if UP in line:
                ready.set()

    threading.Thread(target=watch, daemon=True).start()
    if not ready.wait(300):
        stop_stack(proc)
        raise RuntimeError("labelgrid up did not start in 300 s")
    return proc, f"http://127.0.0.1:{ports['--port']}"


def stop_stack(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def upload_images(url: str, count: int, size: int) -> list[str]:
    ids = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for number in range(count):
            image, _ = synthetic_volume(np.random.default_rng(number), size)
            data = gzip.compress(
                nib.Nifti1Image(image, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes(), compresslevel=1, mtime=0
            )
            image_id = f"bench_{number:04d}"
            answer = client.put(
                "/datastore/image", params={"image": image_id}, files={"file": (f"{image_id}.nii.gz", data)}
            )
            answer.raise_for_status()
            ids.append(image_id)
    return ids


def loop(url: str, ids: list[str]) -> float:
    params = json.dumps({"save_label": True, "label_tag": "loop"})
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as client:
        for image_id in ids:
            answer = client.post(
                f"/infer/{MODEL}", params={"image": image_id, "output": "json"}, data={"params": params}
            )
            answer.raise_for_status()
    return time.perf_counter() - started


def batch(url: str, ids: list[str]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    answer = httpx.post(
        f"{url}/batch/infer/{MODEL}",
        params={"run_sync": "true"},
        json={"images": ids, "label_tag": "batch"},
        timeout=3600,
    )
    answer.raise_for_status()
    return time.perf_counter() - started, answer.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=48, help="volume edge in voxels")
    parser.add_argument("--device", default="auto", help="inference devices of the stack")
    parser.add_argument("--out", type=Path, default=Path("bench/results/batch_infer.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="labelgrid-bench-batch-") as tmp:
        proc, url = start_stack(Path(tmp), args.device)
        try:
            ids = upload_images(url, args.images, args.size)
            devices = httpx.get(f"{url}/logs/gpu", timeout=30).text.strip()
            # One warm-up inference, so neither side pays the model load.
            httpx.post(
                f"{url}/infer/{MODEL}", params={"image": ids[0], "output": "json"}, timeout=600
            ).raise_for_status()
            loop_s = loop(url, ids)
            batch_s, task = batch(url, ids)
        finally:
            stop_stack(proc)
    saved = [image for image, outcome in task.items() if outcome]
    if len(saved) != len(ids):
        raise SystemExit(f"the batch did not finish cleanly: {len(saved)} of {len(ids)} labels saved")
    rows = [
        {"mode": "loop: infer per image", "images": len(ids), "seconds": loop_s, "images/s": len(ids) / loop_s},
        {"mode": "batch: /batch/infer", "images": len(ids), "seconds": batch_s, "images/s": len(ids) / batch_s},
    ]
    speedup = loop_s / batch_s
    print(table(rows, f"batch inference, {len(ids)} images of {args.size}^3, model {MODEL}"))
    print(f"batch / loop throughput: {speedup:.2f}x; load average {os.getloadavg()[0]:.2f}")
    print(devices)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"rows": rows, "speedup": speedup, "size": args.size, "devices": devices, "load_average": os.getloadavg()},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
