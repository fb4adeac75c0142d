"""The active learning gRPC server, for __main__ and the tests alike."""

from __future__ import annotations

from services.activelearning.adapters.metrics import ActiveLearningCollector
from services.activelearning.api.servicer import register, service_names
from services.activelearning.app import ActiveLearning
from services.activelearning.settings import ActiveLearningSettings
from services.common.server import GrpcService


def create_service(settings: ActiveLearningSettings, service: ActiveLearning) -> GrpcService:
    """The server (not started); call `service.start()` once the loop runs. Stopping the
    server stops the scoring runner and closes the datastore client."""
    grpc_service = GrpcService(
        settings,
        service_names(),
        lambda server: register(server, service.sampler, service.scoring),
        on_stop=service.stop,
    )
    grpc_service.registry.register(ActiveLearningCollector(service))
    return grpc_service


async def start_service(settings: ActiveLearningSettings) -> tuple[GrpcService, ActiveLearning]:
    """Builds, starts the background work, and serves."""
    import asyncio

    service = await asyncio.to_thread(ActiveLearning, settings)
    grpc_service = create_service(settings, service)
    await service.start()
    await grpc_service.start()
    return grpc_service, service
