"""Conversions between the active learning protos and the domain: the only code that knows both."""

from __future__ import annotations

from typing import Any

from labelgrid.activelearning.v1 import activelearning_service_pb2 as pb
from labelgrid.activelearning.v1 import resources_pb2 as res

from apps.api.activelearning import ScoringMethod, Strategy
from services.activelearning.domain.model import UNTRAINED, ImageEntry, Lease, NextSample, ScoringJob
from services.common.protos import (
    config_entries,
    dict_to_struct,
    job_error,
    job_state,
    job_times,
    struct_to_dict,
)
from services.common.resource_names import resource_type

_NO_SAMPLE = {
    "": pb.NO_SAMPLE_REASON_UNSPECIFIED,
    "EMPTY": pb.NO_SAMPLE_REASON_EMPTY,
    "ALL_LABELED": pb.NO_SAMPLE_REASON_ALL_LABELED,
    "ALL_LEASED": pb.NO_SAMPLE_REASON_ALL_LEASED,
}

# -- resource names ------------------------------------------------------------------------


STRATEGY = resource_type("labelgrid.activelearning/Strategy")
SCORING_METHOD = resource_type("labelgrid.activelearning/ScoringMethod")
SCORING_JOB = resource_type("labelgrid.activelearning/ScoringJob")
LEASE = resource_type("labelgrid.activelearning/Lease")
MODEL = resource_type("labelgrid.inference/Model")  # the served model that scores
MODEL_VERSION = resource_type("labelgrid.datastore/ModelVersion")


def strategy_of(name: str) -> str:
    return STRATEGY.parse(name)[0]


def method_of(name: str) -> str:
    return SCORING_METHOD.parse(name)[0]


def model_of(name: str) -> str:
    return MODEL.parse(name)[0] if name else ""


def lease_image_of(name: str) -> str:
    return LEASE.parse(name)[0]


def job_of(name: str) -> str:
    return SCORING_JOB.parse(name)[0]


def params_of(struct: Any) -> dict[str, Any]:
    return struct_to_dict(struct)


# -- app parts -------------------------------------------------------------------------------


def strategy(name: str, value: Strategy) -> res.Strategy:
    return res.Strategy(
        name=STRATEGY.format(name), strategy_id=name, description=value.description, config=config_entries(value.config)
    )


def scoring_method(name: str, value: ScoringMethod) -> res.ScoringMethod:
    return res.ScoringMethod(
        name=SCORING_METHOD.format(name),
        method_id=name,
        description=value.description,
        config=config_entries(value.config),
        score_keys=[value.score_key] if value.score_key else [],
    )


# -- results -----------------------------------------------------------------------------------


def next_sample(result: NextSample) -> pb.NextSampleResponse:
    response = pb.NextSampleResponse(
        strategy_info=dict_to_struct(result.strategy_info), no_sample_reason=_NO_SAMPLE[result.no_sample_reason]
    )
    if result.image is not None and result.lease is not None:
        response.image.CopyFrom(sample(result.image))
        response.lease.CopyFrom(lease(result.lease))
    return response


def sample(image: ImageEntry) -> res.Sample:
    return res.Sample(
        image_id=image.image_id,
        file_name=image.file_name,
        sha256=image.sha256,
        info=dict_to_struct(image.info),
        scores=image.scores,
        label_tags=list(image.label_tags),
    )


def lease(value: Lease) -> res.Lease:
    message = res.Lease(
        name=LEASE.format(value.image_id), image_id=value.image_id, client_id=value.client_id, strategy=value.strategy
    )
    message.acquire_time.FromDatetime(value.acquire_time)
    message.expire_time.FromDatetime(value.expire_time)
    return message


def scoring_job(job: ScoringJob) -> res.ScoringJob:
    model, version, progress = job.model, job.model_version, job.progress
    return res.ScoringJob(
        name=SCORING_JOB.format(job.job_id),
        job_id=job.job_id,
        method=SCORING_METHOD.format(job.method),
        model=MODEL.format(model) if model else "",
        params=dict_to_struct(job.params),
        force=job.force,
        model_version=MODEL_VERSION.format(model, version) if version and version != UNTRAINED and model else "",
        state=job_state(job.state),
        times=job_times(job),
        error=job_error(job),
        progress=res.ScoringProgress(
            total=progress.total, scored=progress.scored, skipped=progress.skipped, failed=progress.failed
        ),
        queue_position=job.queue_position,
        log_tail=list(job.log_tail),
    )
