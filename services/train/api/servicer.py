"""gRPC adapter of the training service: convert the request, await the use case, convert the result."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from labelgrid.training.v1 import training_service_pb2 as pb
from labelgrid.training.v1 import training_service_pb2_grpc as pb_grpc

from services.common.paging import offset_page
from services.common.protos import dict_to_struct, job_state_name
from services.common.server import GrpcService
from services.train.adapters.metrics import TrainingCollector
from services.train.api import convert
from services.train.domain.training import Training
from services.train.settings import TrainSettings


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    def __init__(self, training: Training) -> None:
        self.training = training

    async def ListTrainers(self, request: pb.ListTrainersRequest, context: Any) -> pb.ListTrainersResponse:
        return pb.ListTrainersResponse(trainers=[convert.trainer(t) for t in self.training.list_trainers()])

    async def CreateTrainingJob(
        self, request: pb.CreateTrainingJobRequest, context: Any
    ) -> pb.CreateTrainingJobResponse:
        job = await self.training.create(convert.job_request(request.training_job, request.enqueue, request.request_id))
        return pb.CreateTrainingJobResponse(training_job=convert.job(job))

    async def GetTrainingJob(self, request: pb.GetTrainingJobRequest, context: Any) -> pb.GetTrainingJobResponse:
        return pb.GetTrainingJobResponse(
            training_job=convert.job(await self.training.get(convert.job_name(request.name)))
        )

    async def ListTrainingJobs(self, request: pb.ListTrainingJobsRequest, context: Any) -> pb.ListTrainingJobsResponse:
        state = job_state_name(request.state)
        trainer = convert.trainer_name(request.trainer) if request.trainer else None
        jobs = await self.training.list(state, trainer)
        page, token = offset_page(jobs, request.page_size, request.page_token, "ListTrainingJobs")
        return pb.ListTrainingJobsResponse(training_jobs=[convert.job(doc) for doc in page], next_page_token=token)

    async def CancelTrainingJob(
        self, request: pb.CancelTrainingJobRequest, context: Any
    ) -> pb.CancelTrainingJobResponse:
        return pb.CancelTrainingJobResponse(
            training_job=convert.job(await self.training.cancel(convert.job_name(request.name)))
        )

    async def WatchTrainingJob(
        self, request: pb.WatchTrainingJobRequest, context: Any
    ) -> AsyncIterator[pb.WatchTrainingJobResponse]:
        job_id = convert.job_name(request.name)
        async for doc in self.training.watch(job_id):
            yield pb.WatchTrainingJobResponse(training_job=convert.job(doc))

    async def GetTrainStats(self, request: pb.GetTrainStatsRequest, context: Any) -> pb.GetTrainStatsResponse:
        stats, job_id = await self.training.train_stats(convert.trainer_name(request.trainer))
        return pb.GetTrainStatsResponse(
            train_stats=dict_to_struct(stats), training_job=convert.TRAINING_JOB.format(job_id) if job_id else ""
        )

    async def WatchTrainStats(
        self, request: pb.WatchTrainStatsRequest, context: Any
    ) -> AsyncIterator[pb.WatchTrainStatsResponse]:
        async for stats in self.training.watch_train_stats():
            yield pb.WatchTrainStatsResponse(
                train_stats={trainer: dict_to_struct(values) for trainer, values in stats.items()}
            )


def service_names() -> list[str]:
    return [pb.DESCRIPTOR.services_by_name["TrainingService"].full_name]


def create_service(settings: TrainSettings, training: Training, datastore: Any, cache: Any) -> GrpcService:
    """The training gRPC server (not started); stopping it stops running jobs and closes the datastore client."""

    async def on_stop() -> None:
        await training.close()
        await datastore.close()

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(training), server)

    # on_stopping: WatchTrainStats streams never end by themselves; end them before the grace period.
    service = GrpcService(settings, service_names(), register, on_stop=on_stop, on_stopping=training.end_stats_watches)
    service.registry.register(TrainingCollector(training, cache))
    return service
