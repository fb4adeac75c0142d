"""Conversions between the training protos and the domain's job documents."""

from __future__ import annotations

from typing import Any

from labelgrid.training.v1 import resources_pb2 as res

from services.common.errors import InvalidArgument
from services.common.protos import (
    config_entries,
    dict_to_struct,
    job_error,
    job_state,
    job_times,
    struct_to_dict,
)
from services.common.resource_names import resource_type
from services.train.domain.job import TrainingJob
from services.train.domain.training import JobRequest, TrainerInfo

_OPTIONAL = ("val_split", "learning_rate", "amp", "pretrained", "early_stop_patience")


TRAINING_JOB = resource_type("labelgrid.training/TrainingJob")
TRAINER = resource_type("labelgrid.training/Trainer")
MODEL = resource_type("labelgrid.datastore/Model")
MODEL_VERSION = resource_type("labelgrid.datastore/ModelVersion")


def job_name(name: str) -> str:
    return TRAINING_JOB.parse(name)[0]


def trainer_name(name: str) -> str:
    return TRAINER.parse(name)[0]


def trainer(info: TrainerInfo) -> res.Trainer:
    return res.Trainer(
        name=TRAINER.format(info.name),
        trainer_id=info.name,
        model=MODEL.format(info.model),
        description=info.description,
        config=config_entries(info.config),
        labels=info.labels,
    )


def job_request(message: res.TrainingJob, enqueue: bool, request_id: str) -> JobRequest:
    if not message.trainer:
        raise InvalidArgument("training_job.trainer must name a trainer: trainers/{trainer}")
    name = trainer_name(message.trainer)
    p = message.params
    params: dict[str, Any] = struct_to_dict(p.extra) if p.HasField("extra") else {}
    if p.max_epochs:
        params["max_epochs"] = p.max_epochs
    for key in ("train_batch_size", "val_batch_size"):
        if getattr(p, key):
            params[key] = getattr(p, key)
    for key in _OPTIONAL:
        if p.HasField(key):
            params[key] = getattr(p, key)
    version = ""
    if p.initial_model_version:
        model, version = MODEL_VERSION.parse(p.initial_model_version)
        if model != name:
            raise InvalidArgument(
                f"initial_model_version {p.initial_model_version!r} is not a version of model {name!r}"
            )
    return JobRequest(
        trainer=name,
        params=params,
        devices=tuple(p.devices),
        device_count=p.device_count,
        initial_model_version=version,
        enqueue=enqueue,
        request_id=request_id,
    )


def _params(given: dict[str, Any]) -> res.TrainingParams:
    given = dict(given or {})
    out = res.TrainingParams()
    for key in ("max_epochs", "train_batch_size", "val_batch_size"):
        value = given.pop(key, None)
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and float(value).is_integer()
            and abs(value) < 2**31
        ):
            setattr(out, key, int(value))
    for key in _OPTIONAL:
        value = given.pop(key, None)
        if value is None:
            continue
        if key in ("amp", "pretrained") and isinstance(value, bool):
            setattr(out, key, value)
        elif key == "early_stop_patience" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out.early_stop_patience = int(value)
        elif key in ("val_split", "learning_rate") and isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(out, key, float(value))
    if given:
        out.extra.CopyFrom(dict_to_struct(given))
    return out


def job(value: TrainingJob) -> res.TrainingJob:
    out = res.TrainingJob(
        name=TRAINING_JOB.format(value.job_id),
        job_id=value.job_id,
        trainer=TRAINER.format(value.trainer),
        params=_params(value.params),
        state=job_state(value.state),
        times=job_times(value),
        error=job_error(value),
        queue_position=value.queue_position,
        devices=list(value.devices),
        model_version=value.model_version,
        log_tail=list(value.log_tail),
    )
    out.params.device_count = value.device_count
    if value.initial_model_version:
        out.params.initial_model_version = MODEL_VERSION.format(value.trainer, value.initial_model_version)
    progress = value.progress
    if progress:
        out.progress.CopyFrom(
            res.TrainingProgress(
                epoch=progress.epoch,
                total_epochs=progress.total_epochs,
                iteration=progress.iteration,
                total_iterations=progress.total_iterations,
                loss=progress.loss,
                metric_name=progress.metric_name,
                metric=progress.metric,
                best_metric=progress.best_metric,
                best_metric_epoch=progress.best_metric_epoch,
                elapsed_seconds=progress.elapsed_seconds,
                estimated_remaining_seconds=progress.estimated_remaining_seconds,
            )
        )
    if value.train_stats:
        out.train_stats.CopyFrom(dict_to_struct(value.train_stats))
    return out
