"""The child process of one training job: `python -m services.train.adapters.worker SPEC.json`.

Runs under the training service (one process) or under torchrun (one process per device,
DistributedDataParallel: NCCL on GPUs, gloo on the CPU). It loads the app, builds the
trainer's parts, and trains them with MONAI's engines: SupervisedTrainer, a
SupervisedEvaluator run by ValidationHandler, StatsHandler for the log, EarlyStopHandler.
Rank 0 reports through a JSON-lines events file the service tails; the events (started,
iteration, epoch, checkpoint, completed) are the typed schema of `services.train.domain.events`.

The service publishes each checkpoint as a model version. The worker exits when the
service that started it dies (a kill -9 of the service must not leave training running).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from services.train.domain import events

log = logging.getLogger("labelgrid.train.worker")

Emit = Callable[[events.Event], None]


def _watch_parent(pid: int) -> None:
    """Exits this process as soon as `pid` (the training service) is gone."""

    def run() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(70)
            except PermissionError:
                pass

    threading.Thread(target=run, name="parent-watch", daemon=True).start()


def _hms(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _finite(value: Any) -> Any:
    """NaN and infinities (a metric before its first value) as None: JSON and Struct hold no NaN."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _own_labels(trainer: Any, items: list[dict[str, str]]) -> list[dict[str, str]]:
    """The items whose label values the trainer knows (the rest belong to other models)."""
    import numpy as np

    from services.common.models.volumes import load_spatial_image

    kept = []
    for item in items:
        values = {int(v) for v in np.unique(np.asarray(load_spatial_image(item["label"]).dataobj))}
        if trainer.accepts(values):
            kept.append(item)
        else:
            log.info(
                "skipping %s: its label values %s are not this trainer's",
                item.get("image_id", item["image"]),
                sorted(values),
            )
    return kept


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return (
        network.module
        if hasattr(network, "module") and isinstance(network, torch.nn.parallel.DistributedDataParallel)
        else network
    )


def _load_weights(network: torch.nn.Module, path: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    network.load_state_dict(state)


def run_training(spec: dict[str, Any], emit: Emit, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Trains as `spec` says and returns the final train_stats. `emit` gets rank 0's events."""
    from ignite.engine import Events
    from monai.data import CacheDataset, DataLoader, Dataset, ThreadDataLoader, partition_dataset
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import EarlyStopHandler, StatsHandler, ValidationHandler, from_engine
    from monai.transforms import Compose
    from monai.utils import set_determinism

    from apps.api.train import TrainContext
    from services.common.apps import load_app

    params: dict[str, Any] = dict(spec["params"])
    device_name: str = spec["device"]
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    set_determinism(seed=int(spec.get("seed", 0)) + rank)

    if spec.get("bundle"):
        from apps.bundle import BundleInferTask, bundle_trainer, load_bundle

        trainer_def = bundle_trainer(BundleInferTask(load_bundle(Path(spec["bundle"]), spec["trainer"])))
    else:
        trainer_def = load_app(spec["app"]).trainers[spec["trainer"]]
    context = TrainContext(params=params, device=device_name, rank=rank, world_size=world_size)

    train_list = _own_labels(trainer_def, list(spec["train_datalist"]))
    val_list = _own_labels(trainer_def, list(spec["val_datalist"]))
    if not train_list:
        raise RuntimeError(
            f"none of the {len(spec['train_datalist'])} labeled image(s) has labels of trainer {spec['trainer']!r} "
            f"(label values {sorted({0, *trainer_def.labels.values()})})"
        )
    if spec.get("bundle"):
        # A bundle's transforms see only what its own datalist would hold (MONAI reads "image_id" as a meta-dict key).
        train_list = [{"image": item["image"], "label": item["label"]} for item in train_list]
        val_list = [{"image": item["image"], "label": item["label"]} for item in val_list]
    if world_size > 1:
        # Every rank gets its share; with fewer items than ranks each gets them all (MONAI Label does the same).
        if len(train_list) >= world_size:
            train_list = partition_dataset(train_list, num_partitions=world_size, even_divisible=True)[rank]
        if len(val_list) >= world_size:
            val_list = partition_dataset(val_list, num_partitions=world_size, even_divisible=True)[rank]

    use_cache = str(params.get("dataset", "CacheDataset")) == "CacheDataset"
    thread_loader = str(params.get("dataloader", "ThreadDataLoader")) == "ThreadDataLoader"

    def dataset(items: list[dict[str, str]], transforms: Any) -> Any:
        if use_cache:
            return CacheDataset(items, Compose(transforms), progress=False, num_workers=0)
        return Dataset(items, Compose(transforms))

    def loader(data: Any, batch_size: int, shuffle: bool) -> Any:
        if thread_loader:
            return ThreadDataLoader(data, batch_size=batch_size, shuffle=shuffle, num_workers=0)
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, num_workers=0)

    network = trainer_def.network(context)
    if spec.get("initial_weights"):
        _load_weights(network, spec["initial_weights"])
    network = network.to(device)
    if world_size > 1:
        network = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )
    amp = bool(params.get("amp", False)) and device.type == "cuda"
    max_epochs = int(params["max_epochs"])
    started = time.time()
    output_dir = Path(spec["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)

    evaluator = None
    handlers: list[Any] = []
    if val_list:
        evaluator = SupervisedEvaluator(
            device=device,
            val_data_loader=loader(
                dataset(val_list, trainer_def.val_pre_transforms(context)), int(params.get("val_batch_size", 1)), False
            ),
            network=network,
            inferer=trainer_def.val_inferer(context),
            postprocessing=Compose(trainer_def.val_post_transforms(context)),
            key_val_metric=trainer_def.val_key_metric(context),
            amp=amp,
        )
        handlers.append(
            ValidationHandler(validator=evaluator, interval=max(1, int(trainer_def.val_interval)), epoch_level=True)
        )
    if rank == 0:
        handlers.append(
            StatsHandler(tag_name="train_loss", output_transform=from_engine(["loss"], first=True), iteration_log=True)
        )

    train_data = dataset(train_list, trainer_def.train_pre_transforms(context))
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=loader(train_data, int(params.get("train_batch_size", 1)), True),
        network=network,
        optimizer=trainer_def.optimizer(network, context),
        loss_function=trainer_def.loss_function(context),
        inferer=trainer_def.train_inferer(context),
        postprocessing=Compose(trainer_def.train_post_transforms(context)),
        key_train_metric=trainer_def.train_key_metric(context),
        train_handlers=handlers,
        amp=amp,
    )
    patience = int(params.get("early_stop_patience", -1))
    if patience > 0:
        key_engine = evaluator or trainer
        EarlyStopHandler(
            patience=patience,
            score_function=lambda engine: engine.state.metrics[engine.state.key_metric_name],
            trainer=trainer,
            epoch_level=True,
        ).attach(key_engine)

    best = {"metric": float("-inf"), "epoch": 0}
    stats: dict[str, Any] = {}

    def engine_stats(engine: Any) -> dict[str, Any]:
        return {
            "metrics": {k: _to_float(v) for k, v in engine.state.metrics.items()},
            "key_metric_name": engine.state.key_metric_name,
            "best_metric": _to_float(engine.state.best_metric),
            "best_metric_epoch": int(engine.state.best_metric_epoch),
        }

    def make_stats(final: bool) -> dict[str, Any]:
        elapsed = time.time() - started
        out = {
            "rank": rank,
            "current_epoch": int(trainer.state.epoch),
            "current_iteration": int(trainer.state.iteration),
            "total_epochs": max_epochs,
            "total_iterations": int(trainer.state.epoch_length or 0) * max_epochs,
            "epoch": int(trainer.state.epoch),
            "start_ts": int(started),
            "best_metric": best["metric"] if best["epoch"] else _to_float(trainer.state.best_metric),
            "train": engine_stats(trainer),
        }
        if evaluator is not None and evaluator.state.metrics:
            out["eval"] = engine_stats(evaluator)
        # MONAI Label sets one of the two: Slicer reads "total_time" as "the run has ended".
        out["total_time" if final else "current_time"] = _hms(elapsed)
        return _finite(out)

    last_tick = [0.0]

    def on_iteration(engine: Any) -> None:
        now = time.monotonic()
        if now - last_tick[0] < 0.5 and engine.state.iteration % engine.state.epoch_length:
            return
        last_tick[0] = now
        output = engine.state.output
        loss = (
            output[0]["loss"]
            if isinstance(output, list) and output
            else output.get("loss")
            if isinstance(output, dict)
            else None
        )
        emit(events.Iteration(
            epoch=int(engine.state.epoch),
            iteration=int(engine.state.iteration),
            epoch_length=int(engine.state.epoch_length or 0),
            max_epochs=max_epochs,
            loss=_finite(_to_float(loss.item() if isinstance(loss, torch.Tensor) else loss)),
            elapsed_seconds=time.time() - started,
        ))  # fmt: skip

    def on_epoch(engine: Any) -> None:
        key_engine = evaluator if evaluator is not None and evaluator.state.metrics else engine
        name = key_engine.state.key_metric_name
        metric = _to_float(key_engine.state.metrics.get(name))
        if metric == metric and metric > best["metric"]:  # not NaN, and better
            best.update(metric=metric, epoch=int(engine.state.epoch))
            path = output_dir / f"model_epoch{engine.state.epoch:04d}.pt"
            tmp = path.with_suffix(".tmp")
            torch.save(_unwrap(network).state_dict(), tmp)
            os.replace(tmp, path)
            emit(events.Checkpoint(path=str(path), metric_name=name, metric=metric, epoch=int(engine.state.epoch)))
        stats.clear()
        stats.update(make_stats(final=False))
        emit(events.Epoch(epoch=int(engine.state.epoch), metric_name=name, metric=_finite(metric), stats=dict(stats)))

    if rank == 0:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, on_iteration)
        # After ValidationHandler (attached first), so the evaluator's metric is this epoch's.
        trainer.add_event_handler(Events.EPOCH_COMPLETED, on_epoch)
        emit(events.Started(train_items=len(train_list), val_items=len(val_list), world_size=world_size))
    trainer.run()
    final = make_stats(final=True)
    if rank == 0:
        emit(events.Completed(stats=final))
    return final


def _file_emitter(path: str) -> Emit:
    file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the emitter's whole life

    def emit(event: events.Event) -> None:
        file.write(json.dumps(events.encode(event)) + "\n")
        file.flush()

    return emit


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    spec = json.loads(Path(args[0]).read_text())
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="[%(asctime)s] %(levelname)s %(name)s - %(message)s"
    )
    parent = int(os.environ.get("LABELGRID_TRAIN_PARENT_PID", "0"))
    if parent:
        _watch_parent(parent)
    if spec.get("torch_threads"):
        torch.set_num_threads(int(spec["torch_threads"]))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    devices = list(spec["devices"])
    spec = {**spec, "device": devices[local_rank] if local_rank < len(devices) else devices[0]}
    if world_size > 1:
        backend = "nccl" if spec["device"].startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
    emit = _file_emitter(spec["events"]) if rank == 0 else (lambda event: None)
    try:
        run_training(spec, emit, rank=rank, world_size=world_size)
    finally:
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if world_size > 1:
        # The work is done and the process group destroyed, yet the interpreter's exit then
        # aborts now and then (SIGABRT, "terminate called without an active exception": torch
        # leaves a C++ thread joinable), and torchrun fails the whole job for it. Nothing is
        # left to run at exit (events are flushed as written), so leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
