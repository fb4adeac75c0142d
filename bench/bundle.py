"""Bundle benchmark: a MONAI Bundle served through labelgrid's REST API vs the same bundle run bare.

    python -m bench.bundle [--sizes 64,128] [--runs 30,15] [--batch-images 100] [--out bench/results/bundle.json]

The bundle is tests/fixtures/bundles.py's 3D CT segmentation bundle (seeded weights, the
standard CT pipeline: LoadImaged, Orientationd, Spacingd 1.5x1.5x2 mm, ScaleIntensityRanged,
SlidingWindowInferer 32³, Invertd, SaveImaged). Latency (p50 / p95, seconds) per image of
  (a) workflow: the bundle's inference config run by MONAI itself in this process
      (`monai.bundle.ConfigWorkflow`, initialised once, then `run()` per image: its DataLoader,
      SupervisedEvaluator with CheckpointLoader, postprocessing and SaveImaged writing the label);
  (a') pipeline: the bundle's parts parsed once by ConfigParser and called directly per image
      (preprocessing, network under the inferer, postprocessing with SaveImaged): the floor;
  (b) REST: MONAI Label's POST /infer/{bundle}?output=image of a `labelgrid up --bundle` stack
      (Envoy, gateway, inference, datastore, each its own process), the label streamed back.
Interleaved round by round on the same image (the order rotating per round), with the same
torch thread count on both sides (--torch-threads, default 1). Besides each side's median, the
ratio is also the median of the per-round ratios (REST and bare timed in the same round, so load
that comes and goes on a shared machine cancels out of it).

Then batch inference of the same bundle model over --batch-images small volumes (48³): one
POST /batch/infer/{bundle}?run_sync=true vs one client calling POST /infer/{bundle} with
save_label image after image, alternated loop, batch, batch, loop (medians), each result saved
as a label in both. Prints tables and writes JSON; numbers, not assertions. On a shared 2-core
machine the spread is wide; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np

from bench.datastore import table
from bench.infer import interleaved, p
from tests.fixtures.bundles import make_bundle
from tests.integration.test_labelgrid_up import start_stack, stop_stack

BATCH_SIZE = 48  # edge of the batch volumes

MODEL = "ct_bench"


def ct_volume(size: int, dest: Path) -> Path:
    """A size³ CT-like volume (HU values, blobs on noise) at 1.5 mm, RAS-flipped on two axes."""
    from monai.data import create_test_image_3d

    image, _ = create_test_image_3d(size, size, size, num_objs=6, rad_max=max(4, size // 6), rad_min=3, noise_max=0.3,
                                    random_state=np.random.RandomState(size))  # fmt: skip
    affine = np.array([[-1.5, 0, 0, 0], [0, -1.5, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image((image * 200.0 - 40.0).astype(np.float32), affine), str(dest))
    return dest


def bare_workflow(bundle: Path, data_dir: Path, out_dir: Path) -> Any:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type="inference",
        bundle_root=str(bundle),
        dataset_dir=str(data_dir),
        output_dir=str(out_dir),
    )
    workflow.initialize()
    return workflow


class BarePipeline:
    """The bundle's own parts parsed once by monai.bundle.ConfigParser and called directly per image:
    preprocessing (LoadImaged ...), the network with models/model.pt under the inferer, then
    postprocessing (Invertd ... SaveImaged). No DataLoader, engine or handlers around them."""

    def __init__(self, bundle: Path, image: Path, out_dir: Path):
        import torch
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser.update({"bundle_root": str(bundle), "output_dir": str(out_dir), "device": "$torch.device('cpu')"})
        self.pre = parser.get_parsed_content("preprocessing")
        self.post = parser.get_parsed_content("postprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.network = parser.get_parsed_content("network")
        self.network.load_state_dict(
            torch.load(str(bundle / "models" / "model.pt"), map_location="cpu", weights_only=True)
        )
        self.network.eval()
        self.image = str(image)

    def __call__(self) -> None:
        import torch

        data = self.pre({"image": self.image})
        with torch.no_grad():
            data["pred"] = self.inferer(data["image"][None], self.network)[0]
        self.post(data)


def paired(times: dict[str, list[float]], over: str, under: str) -> float:
    """Median of the per-round ratios over / under (both timed in the same round)."""
    return float(np.median(np.asarray(times[over]) / np.asarray(times[under])))


def batch_throughput(http: httpx.Client, work: Path, count: int) -> list[dict[str, Any]]:
    """The bundle over `count` volumes: one run_sync batch vs a client calling infer per image."""
    ids = []
    for number in range(count):
        path = ct_volume(BATCH_SIZE, work / f"batch_{number:03d}.nii.gz")
        image_id = f"batch_{number:03d}"
        response = http.put("/datastore/", params={"image": image_id}, files={"file": (path.name, path.read_bytes())})
        response.raise_for_status()
        ids.append(image_id)
    http.post(f"/infer/{MODEL}", params={"image": ids[0], "output": "json"}, data={"params": "{}"}).raise_for_status()

    def loop() -> None:
        params = json.dumps({"save_label": True, "label_tag": "loop"})
        for image_id in ids:
            http.post(
                f"/infer/{MODEL}", params={"image": image_id, "output": "json"}, data={"params": params}
            ).raise_for_status()

    def batch() -> None:
        answer = http.post(
            f"/batch/infer/{MODEL}", params={"run_sync": "true"}, json={"images": ids, "label_tag": "batch"}
        )
        answer.raise_for_status()
        done = [image for image, outcome in answer.json().items() if outcome]
        if len(done) != len(ids):
            raise RuntimeError(f"the batch saved {len(done)} of {len(ids)} labels")

    times: dict[str, list[float]] = {"loop": [], "batch": []}
    for name, call in (("loop", loop), ("batch", batch), ("batch", batch), ("loop", loop)):
        started = time.perf_counter()
        call()
        times[name].append(time.perf_counter() - started)
    rows = []
    for name, label in (("loop", "loop: infer per image"), ("batch", "batch: /batch/infer run_sync")):
        seconds = float(np.median(times[name]))
        rows.append(
            {"mode": label, "images": count, "seconds": seconds, "images/s": count / seconds, "runs": times[name]}
        )
    return rows


def run(sizes: list[int], runs: list[int], work: Path, batch_images: int) -> dict[str, Any]:
    bundle = make_bundle(work / MODEL, seed=3, train=False)
    (work / "images").mkdir()
    images = {size: ct_volume(size, work / "images" / f"ct_{size}.nii.gz") for size in sizes}
    stack = start_stack(work / "stack-root", sample_studies=False, extra=["--bundle", str(bundle)])
    rows = []
    try:
        with httpx.Client(base_url=stack.url, timeout=600) as http:
            for path in images.values():
                image_id = path.name[: -len(".nii.gz")]
                response = http.put(
                    "/datastore/", params={"image": image_id}, files={"file": (path.name, path.read_bytes())}
                )
                if response.status_code not in (200, 409):
                    raise RuntimeError(f"upload failed: {response.status_code} {response.text}")
            for size, count in zip(sizes, runs, strict=True):
                image_id = f"ct_{size}"
                data_dir = work / f"data_{size}"
                data_dir.mkdir()
                shutil.copy(images[size], data_dir / images[size].name)
                workflow = bare_workflow(bundle, data_dir, work / f"out_{size}")
                pipeline = BarePipeline(bundle, images[size], work / f"pipe_{size}")

                def rest(image_id: str = image_id) -> None:
                    response = http.post(
                        f"/infer/{MODEL}", params={"image": image_id, "output": "image"}, data={"params": "{}"}
                    )
                    if response.status_code != 200:
                        raise RuntimeError(f"infer failed: {response.status_code} {response.text}")

                times = interleaved({"workflow": workflow.run, "pipeline": pipeline, "rest": rest}, count)
                workflow.finalize()
                rest50 = p(times["rest"], 50)
                rows.append({
                    "size": f"{size}^3", "runs": count,
                    "workflow_p50": p(times["workflow"], 50), "pipeline_p50": p(times["pipeline"], 50),
                    "pipeline_p95": p(times["pipeline"], 95), "rest_p50": rest50, "rest_p95": p(times["rest"], 95),
                    "rest/pipeline": rest50 / p(times["pipeline"], 50), "rest/workflow": rest50 / p(times["workflow"], 50),
                    "paired rest/pipeline": paired(times, "rest", "pipeline"),
                    "paired rest/workflow": paired(times, "rest", "workflow"),
                })  # fmt: skip
            batch_rows = batch_throughput(http, work / "images", batch_images) if batch_images else []
    finally:
        stop_stack(stack)
    return {"model": MODEL, "latency": rows, "batch": batch_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,128", help="cube sides of the synthetic CT volumes")
    parser.add_argument("--runs", default="30,15", help="timed rounds per size (after one warm-up)")
    parser.add_argument("--batch-images", type=int, default=100, help="volumes of the batch vs loop run (0: skip it)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/bundle.json"))
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads here and in the stack's services (LABELGRID_TORCH_THREADS): the same on both sides; "
                             "on a loaded 2-core machine 2 OpenMP threads run an order of magnitude slower than 1")  # fmt: skip
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)
    os.environ["LABELGRID_TORCH_THREADS"] = str(args.torch_threads)
    sizes = [int(v) for v in args.sizes.split(",")]
    runs = [int(v) for v in args.runs.split(",")]
    if len(runs) != len(sizes):
        parser.error("--runs needs one count per size")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="labelgrid-bench-bundle-") as tmp:
        result = run(sizes, runs, Path(tmp), args.batch_images)
    result["loadavg"] = {"before": load_before, "after": os.getloadavg()}
    result["torch_threads"] = args.torch_threads
    print()
    print(
        table(
            result["latency"],
            f"bundle {MODEL} latency (s): in-process monai.bundle workflow run / bare parsed pipeline vs REST via Envoy",
        )
    )
    if result["batch"]:
        rows = [{k: v for k, v in row.items() if k != "runs"} for row in result["batch"]]
        print()
        print(
            table(
                rows,
                f"bundle {MODEL}: batch inference over {args.batch_images} images of {BATCH_SIZE}^3 (medians of 2)",
            )
        )
        loop_s, batch_s = (row["seconds"] for row in result["batch"])
        result["batch_speedup"] = loop_s / batch_s
        print(f"batch / loop throughput: {loop_s / batch_s:.2f}x")
    print(
        f"load average before {result['loadavg']['before'][0]:.1f}, after {result['loadavg']['after'][0]:.1f} (a shared machine)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
