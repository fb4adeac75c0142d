"""A bundle's multi-GPU train config (apps/bundle_train.py): laid over train.json above one device,
as MONAI Label's BundleTrainTask runs `['train.json', 'multi_gpu_train.json']`, with MONAI Label's
overrides over both; ignored on one device. Then a real two-process DistributedDataParallel run
(gloo, CPU) of the training worker on that bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apps.api.train import TrainContext
from apps.bundle import BundleError, BundleInferTask, bundle_trainer, check_bundle, load_bundle
from tests.fixtures.bundles import ct_image, make_bundle

ROOT = Path(__file__).resolve().parents[2]

# The Model Zoo's multi_gpu_train.json shape (spleen_deepedit_annotation): a rank device, a DDP
# network, samplers, NCCL in `initialize`; plus one change to a part labelgrid builds (the lr).
MULTI_GPU = {
    "device": "$torch.device('cuda:' + os.environ['LOCAL_RANK'])",
    "network": {
        "_target_": "torch.nn.parallel.DistributedDataParallel",
        "module": "$@network_def.to(@device)",
        "device_ids": ["@device"],
    },
    "optimizer#lr": 0.004,
    "train#sampler": {
        "_target_": "DistributedSampler",
        "dataset": "@train#dataset",
        "even_divisible": True,
        "shuffle": True,
    },
    "train#dataloader#sampler": "@train#sampler",
    "initialize": [
        "$import torch.distributed as dist",
        "$dist.is_initialized() or dist.init_process_group(backend='nccl')",
    ],
    "run": ["$@train#trainer.run()"],
    "finalize": ["$dist.is_initialized() and dist.destroy_process_group()"],
}


def _bundle(folder: Path, multi: dict | None = MULTI_GPU) -> Path:
    make_bundle(folder, seed=2)
    train = json.loads((folder / "configs" / "train.json").read_text())
    train["train"]["trainer"] = {"max_epochs": 100}  # MONAI Label overrides train#trainer#max_epochs
    # What a Model Zoo train.json has and labelgrid's worker replaces (its own datalist and loader).
    train["train"]["dataset"] = {"_target_": "Dataset", "data": [], "transform": "@train#preprocessing"}
    train["train"]["dataloader"] = {
        "_target_": "DataLoader",
        "dataset": "@train#dataset",
        "batch_size": 1,
        "shuffle": True,
    }
    (folder / "configs" / "train.json").write_text(json.dumps(train))
    if multi is not None:
        (folder / "configs" / "multi_gpu_train.json").write_text(json.dumps(multi))
    return folder


def test_multi_gpu_config_applies_above_one_device_only(tmp_path: Path) -> None:
    bundle = load_bundle(_bundle(tmp_path / "ct_multi"))
    assert bundle.multi_gpu_config is not None and bundle.multi_gpu_config.name == "multi_gpu_train.json"
    check_bundle(bundle)  # both the one-device and the multi-device parts build
    trainer = bundle_trainer(BundleInferTask(bundle))
    network = torch.nn.Linear(2, 2)
    one = TrainContext(params={"max_epochs": 3}, device="cpu", rank=0, world_size=1)
    two = TrainContext(params={"max_epochs": 3}, device="cpu", rank=1, world_size=2)

    assert trainer.configs(one) == ["configs/train.json"]
    assert trainer.configs(two) == ["configs/train.json", "configs/multi_gpu_train.json"]
    assert trainer.optimizer(network, one).param_groups[0]["lr"] == pytest.approx(0.001)  # train.json's
    assert trainer.optimizer(network, two).param_groups[0]["lr"] == pytest.approx(0.004)  # multi_gpu_train.json's
    for context in (one, two):
        parser = trainer._parser(context)
        # MONAI Label's overrides win over both files: this rank's device (not 'cuda:' + LOCAL_RANK),
        # the bundle root, the checkpoint folder and the request's max_epochs.
        assert parser.get_parsed_content("device") == torch.device("cpu")
        assert parser["bundle_root"] == str(bundle.root)
        assert parser["ckpt_dir"] == str(bundle.root / "models")
        assert parser["train#trainer#max_epochs"] == 3
    # The multi-GPU config's plumbing is never evaluated (its initialize would need NCCL and CUDA).
    assert not torch.distributed.is_initialized()
    assert "initialize" in trainer._parser(two) and "initialize" not in trainer._parser(one)


def test_a_broken_multi_gpu_config_is_refused_naming_it(tmp_path: Path) -> None:
    broken = {"optimizer": {"_target_": "torch.optim.NoSuchOptimizer", "params": "$@network.parameters()"}}
    bundle = load_bundle(_bundle(tmp_path / "ct_broken", broken))
    with pytest.raises(BundleError) as caught:
        check_bundle(bundle)
    assert "configs/multi_gpu_train.json" in str(caught.value) and "'optimizer'" in str(caught.value)
    # without it the same bundle is fine
    (bundle.root / "configs" / "multi_gpu_train.json").unlink()
    check_bundle(load_bundle(bundle.root))


@pytest.mark.timeout(240)
def test_two_gloo_processes_train_the_bundle_with_its_multi_gpu_config(tmp_path: Path) -> None:
    folder = _bundle(tmp_path / "ct_ddp")
    items = []
    for index in range(2):
        image = ct_image(tmp_path / f"img{index}.nii.gz", seed=index)
        items.append(
            {"image": str(image), "label": str(image.with_name(f"img{index}_label.nii.gz")), "image_id": f"img{index}"}
        )
    spec = {
        "app": "apps.radiology", "trainer": "ct_ddp", "bundle": str(folder),
        "params": {"max_epochs": 1, "train_batch_size": 1, "val_batch_size": 1},
        "train_datalist": items, "val_datalist": [], "initial_weights": None,
        "output_dir": str(tmp_path / "out"), "events": str(tmp_path / "events.jsonl"),
        "devices": ["cpu", "cpu"], "torch_threads": 1, "seed": 0,
    }  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
               "-m", "services.train.adapters.worker", str(tmp_path / "spec.json")]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events if e["type"] == "started")
    # rank 0 trains its share of the two images; the world is both processes
    assert started["world_size"] == 2 and started["train_items"] == 1, started
    completed = [e for e in events if e["type"] == "completed"]
    assert completed and completed[0]["stats"]["total_epochs"] == 1, events[-3:]
