"""gRPC adapter of the active learning service: convert the request, await the use case, convert the result."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from labelgrid.activelearning.v1 import activelearning_service_pb2 as pb
from labelgrid.activelearning.v1 import activelearning_service_pb2_grpc as pb_grpc

from services.activelearning.api import convert
from services.activelearning.domain.next_sample import NextSampler
from services.activelearning.domain.scoring import ScoringJobs
from services.common.protos import job_state_name


class ActiveLearningServicer(pb_grpc.ActiveLearningServiceServicer):
    def __init__(self, sampler: NextSampler, scoring: ScoringJobs) -> None:
        self.sampler = sampler
        self.scoring = scoring

    async def ListStrategies(self, request: pb.ListStrategiesRequest, context: Any) -> pb.ListStrategiesResponse:
        strategies = self.sampler.app.strategies
        return pb.ListStrategiesResponse(strategies=[convert.strategy(k, v) for k, v in strategies.items()])

    async def ListScoringMethods(
        self, request: pb.ListScoringMethodsRequest, context: Any
    ) -> pb.ListScoringMethodsResponse:
        methods = self.scoring.app.scoring_methods
        return pb.ListScoringMethodsResponse(scoring_methods=[convert.scoring_method(k, v) for k, v in methods.items()])

    # -- next sample and leases ---------------------------------------------------------------

    async def NextSample(self, request: pb.NextSampleRequest, context: Any) -> pb.NextSampleResponse:
        result = await self.sampler.next_sample(
            convert.strategy_of(request.strategy),
            request.client_id,
            convert.params_of(request.params),
            request.lease_ttl_seconds,
        )
        return convert.next_sample(result)

    async def RenewLease(self, request: pb.RenewLeaseRequest, context: Any) -> pb.RenewLeaseResponse:
        lease = await self.sampler.renew(convert.lease_image_of(request.name), request.client_id, request.ttl_seconds)
        return pb.RenewLeaseResponse(lease=convert.lease(lease))

    async def ReleaseLease(self, request: pb.ReleaseLeaseRequest, context: Any) -> pb.ReleaseLeaseResponse:
        await self.sampler.release(convert.lease_image_of(request.name), request.client_id)
        return pb.ReleaseLeaseResponse()

    async def ListLeases(self, request: pb.ListLeasesRequest, context: Any) -> pb.ListLeasesResponse:
        page = await self.sampler.list_leases(request.client_id, request.page_size, request.page_token)
        return pb.ListLeasesResponse(
            leases=[convert.lease(lease) for lease in page.leases], next_page_token=page.next_page_token
        )

    # -- scoring jobs ---------------------------------------------------------------------------

    async def CreateScoringJob(self, request: pb.CreateScoringJobRequest, context: Any) -> pb.CreateScoringJobResponse:
        job = request.scoring_job
        doc = await self.scoring.create(
            convert.method_of(job.method),
            model=convert.model_of(job.model),
            params=convert.params_of(job.params),
            force=job.force,
            enqueue=request.enqueue,
            request_id=request.request_id,
        )
        return pb.CreateScoringJobResponse(scoring_job=convert.scoring_job(doc))

    async def GetScoringJob(self, request: pb.GetScoringJobRequest, context: Any) -> pb.GetScoringJobResponse:
        return pb.GetScoringJobResponse(
            scoring_job=convert.scoring_job(await self.scoring.get(convert.job_of(request.name)))
        )

    async def ListScoringJobs(self, request: pb.ListScoringJobsRequest, context: Any) -> pb.ListScoringJobsResponse:
        page = await self.scoring.list(
            state=job_state_name(request.state) or "",
            method=convert.method_of(request.method) if request.method else "",
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListScoringJobsResponse(
            scoring_jobs=[convert.scoring_job(doc) for doc in page.jobs], next_page_token=page.next_page_token
        )

    async def CancelScoringJob(self, request: pb.CancelScoringJobRequest, context: Any) -> pb.CancelScoringJobResponse:
        doc = await self.scoring.cancel(convert.job_of(request.name))
        return pb.CancelScoringJobResponse(scoring_job=convert.scoring_job(doc))

    async def WatchScoringJob(
        self, request: pb.WatchScoringJobRequest, context: Any
    ) -> AsyncIterator[pb.WatchScoringJobResponse]:
        async for doc in self.scoring.watch(convert.job_of(request.name)):
            yield pb.WatchScoringJobResponse(scoring_job=convert.scoring_job(doc))


def service_names() -> list[str]:
    return [pb.DESCRIPTOR.services_by_name["ActiveLearningService"].full_name]


def register(server: grpc.aio.Server, sampler: NextSampler, scoring: ScoringJobs) -> None:
    pb_grpc.add_ActiveLearningServiceServicer_to_server(ActiveLearningServicer(sampler, scoring), server)
