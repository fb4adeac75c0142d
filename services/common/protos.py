"""Helpers every proto adapter needs: Struct <-> dict, config values and jobs (resource names:
services.common.resource_names)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2
from labelgrid.common.v1 import common_pb2

from services.common.errors import InvalidArgument
from services.common.jobs import Job, JobState


def _integral(value: Any) -> Any:
    """Struct holds every number as a double; give JSON integers (MONAI Label's ts, idx) back as int."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def struct_to_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    return _integral(json_format.MessageToDict(message))


def dict_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


# -- app config and jobs, as every service's contract spells them ---------------------------


def config_value(value: Any) -> common_pb2.ConfigValue:
    """One MONAI Label config value (a list is a choice, default first) as a ConfigValue."""
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


def config_entries(config: dict[str, Any]) -> list[common_pb2.ConfigEntry]:
    return [common_pb2.ConfigEntry(key=key, value=config_value(value)) for key, value in config.items()]


JOB_STATE_NAMES = frozenset(
    v.name.removeprefix("JOB_STATE_") for v in common_pb2.JobState.DESCRIPTOR.values if v.number
)
"""The states a job can be in: "QUEUED", "RUNNING", ... (services.common.jobs.JobState)."""


def job_state(name: str | None) -> common_pb2.JobState.ValueType:
    """A job's state ("RUNNING") as the JobState enum; UNSPECIFIED when unknown."""
    return (
        common_pb2.JobState.Value(f"JOB_STATE_{name}") if name in JOB_STATE_NAMES else common_pb2.JOB_STATE_UNSPECIFIED
    )


def job_state_name(value: int) -> str | None:
    """A JobState filter as services.common.jobs.JobState spells it; None for UNSPECIFIED; INVALID_INPUT if unknown."""
    if value == common_pb2.JOB_STATE_UNSPECIFIED:
        return None
    try:
        return common_pb2.JobState.Name(value).removeprefix("JOB_STATE_")
    except ValueError:
        raise InvalidArgument(f"unknown job state {value}") from None


def job_times(job: Job) -> common_pb2.JobTimes:
    """create/start/end_time of a job as JobTimes."""
    times = common_pb2.JobTimes()
    for key in ("create_time", "start_time", "end_time"):
        value = getattr(job, key)
        if value is not None:
            getattr(times, key).FromDatetime(value)
    return times


def job_error(job: Job) -> common_pb2.JobError | None:
    """The error of a FAILED job; None otherwise."""
    if job.state != JobState.FAILED or job.error is None:
        return None
    return common_pb2.JobError(reason=job.error.reason, message=job.error.message)
