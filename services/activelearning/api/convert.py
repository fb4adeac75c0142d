"""Conversions between the active learning protos and the domain: the only code that knows both."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2
from labelgrid.activelearning.v1 import activelearning_service_pb2 as pb
from labelgrid.activelearning.v1 import resources_pb2 as res
from labelgrid.common.v1 import common_pb2

from apps.activelearning import ScoringMethod, Strategy
from services.activelearning.domain.model import UNTRAINED, NextSample
from services.common.errors import InvalidArgument
from services.common.protos import dict_to_struct, split_resource_name, struct_to_dict

_NO_SAMPLE = {
    "": pb.NO_SAMPLE_REASON_UNSPECIFIED,
    "EMPTY": pb.NO_SAMPLE_REASON_EMPTY,
    "ALL_LABELED": pb.NO_SAMPLE_REASON_ALL_LABELED,
    "ALL_LEASED": pb.NO_SAMPLE_REASON_ALL_LEASED,
}
_STATES = {
    "QUEUED": common_pb2.JOB_STATE_QUEUED,
    "RUNNING": common_pb2.JOB_STATE_RUNNING,
    "SUCCEEDED": common_pb2.JOB_STATE_SUCCEEDED,
    "FAILED": common_pb2.JOB_STATE_FAILED,
    "CANCELLED": common_pb2.JOB_STATE_CANCELLED,
}
_STATE_NAMES = {value: key for key, value in _STATES.items()}

# -- resource names ------------------------------------------------------------------------


def strategy_of(name: str) -> str:
    return split_resource_name(name, "strategies/{strategy}")[0]


def method_of(name: str) -> str:
    return split_resource_name(name, "scoringMethods/{method}")[0]


def model_of(name: str) -> str:
    return split_resource_name(name, "models/{model}")[0] if name else ""


def lease_image_of(name: str) -> str:
    return split_resource_name(name, "leases/{image}")[0]


def job_of(name: str) -> str:
    return split_resource_name(name, "scoringJobs/{job}")[0]


def state_of(value: int) -> str:
    if value == common_pb2.JOB_STATE_UNSPECIFIED:
        return ""
    if value not in _STATE_NAMES:
        raise InvalidArgument(f"unknown job state {value}")
    return _STATE_NAMES[value]


def params_of(struct: Any) -> dict[str, Any]:
    return struct_to_dict(struct)


# -- app parts -------------------------------------------------------------------------------


def config_value(value: Any) -> common_pb2.ConfigValue:
    if value is None:
        return common_pb2.ConfigValue()
    if isinstance(value, bool):
        return common_pb2.ConfigValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.ConfigValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.ConfigValue(double_value=value)
    if isinstance(value, (list, tuple)):
        return common_pb2.ConfigValue(choice_value=common_pb2.ConfigChoice(options=[str(v) for v in value]))
    return common_pb2.ConfigValue(string_value=str(value))


def _config(config: dict[str, Any]) -> list[common_pb2.ConfigEntry]:
    return [common_pb2.ConfigEntry(key=key, value=config_value(value)) for key, value in config.items()]


def strategy(name: str, value: Strategy) -> res.Strategy:
    return res.Strategy(
        name=f"strategies/{name}", strategy_id=name, description=value.description, config=_config(value.config)
    )


def scoring_method(name: str, value: ScoringMethod) -> res.ScoringMethod:
    return res.ScoringMethod(
        name=f"scoringMethods/{name}",
        method_id=name,
        description=value.description,
        config=_config(value.config),
        score_keys=[value.score_key] if value.score_key else [],
    )


# -- results -----------------------------------------------------------------------------------


def next_sample(result: NextSample) -> pb.NextSampleResponse:
    response = pb.NextSampleResponse(
        strategy_info=dict_to_struct(result.strategy_info), no_sample_reason=_NO_SAMPLE[result.no_sample_reason]
    )
    if result.image is not None and result.lease is not None:
        response.image.CopyFrom(result.image.raw)
        response.lease.CopyFrom(result.lease.raw)
    return response


def _timestamp(value: str | None) -> timestamp_pb2.Timestamp | None:
    if not value:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.fromisoformat(value))
    return stamp


def scoring_job(doc: dict[str, Any]) -> res.ScoringJob:
    model = doc.get("model", "")
    version = doc.get("model_version", "")
    progress = doc.get("progress") or {}
    error = doc.get("error")
    job = res.ScoringJob(
        name=f"scoringJobs/{doc['job_id']}",
        job_id=doc["job_id"],
        method=f"scoringMethods/{doc.get('method', '')}",
        model=f"models/{model}" if model else "",
        params=dict_to_struct(doc.get("params") or {}),
        force=bool(doc.get("force")),
        model_version=f"models/{model}/versions/{version}" if version and version != UNTRAINED and model else "",
        state=_STATES.get(doc.get("state", ""), common_pb2.JOB_STATE_UNSPECIFIED),
        progress=res.ScoringProgress(
            total=int(progress.get("total", 0)),
            scored=int(progress.get("scored", 0)),
            skipped=int(progress.get("skipped", 0)),
            failed=int(progress.get("failed", 0)),
        ),
        queue_position=int(doc.get("queue_position", 0)),
        log_tail=[str(line) for line in doc.get("log_tail") or []],
    )
    for field in ("create_time", "start_time", "end_time"):
        stamp = _timestamp(doc.get(field))
        if stamp is not None:
            getattr(job.times, field).CopyFrom(stamp)
    if error and doc.get("state") == "FAILED":
        job.error.CopyFrom(common_pb2.JobError(reason=str(error.get("reason", "")), message=str(error.get("message", ""))))
    return job
