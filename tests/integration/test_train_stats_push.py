"""WatchTrainStats: the training service pushes every trainer's stats (at once, then on every
change), and the gateway keeps /info/ under them: a push drops the kept /info/ answer, so
/info/ costs no training call per request and never shows stats older than the last push.
A real datastore and gateway (in-process) and a real training service process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import httpx
import pytest
from labelgrid.datastore.v1 import datastore_service_pb2_grpc as ds_grpc
from labelgrid.training.v1 import resources_pb2 as res
from labelgrid.training.v1 import training_service_pb2 as pb
from labelgrid.training.v1 import training_service_pb2_grpc as pb_grpc

from gateway.changes import INFO_KEY, ChangeWatch, TrainStatsWatch
from services.common.protos import struct_to_dict
from tests.fixtures.gateway import GatewayStack, gateway_with_training
from tests.fixtures.polling import eventually
from tests.fixtures.processes import ServiceProcess

WAIT = 30.0  # bound of one push; a push comes in milliseconds
TRAINERS = ["segmentation", "segmentation_brain", "deepgrow", "deepedit"]


class Stack:
    def __init__(self, gateway: GatewayStack, training: list[ServiceProcess]) -> None:
        self.gateway = gateway
        self._training = training

    @property
    def training(self) -> ServiceProcess:
        return self._training[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with gateway_with_training(tmp_path_factory.mktemp("train-stats")) as (gateway, training):
        yield Stack(gateway, training)


async def test_stats_are_pushed_and_drop_the_kept_info(stack: Stack) -> None:
    async with (
        grpc.aio.insecure_channel(stack.training.address) as train_channel,
        grpc.aio.insecure_channel(stack.gateway.datastore_address) as ds_channel,
    ):
        stub = pb_grpc.TrainingServiceStub(train_channel)
        # The raw stream: every trainer at once, empty before its first run.
        call = stub.WatchTrainStats(pb.WatchTrainStatsRequest())
        first = await asyncio.wait_for(call.read(), WAIT)
        assert sorted(first.train_stats) == sorted(TRAINERS)
        assert all(not struct_to_dict(s) for s in first.train_stats.values())

        # The gateway's side: one ChangeWatch (datastore) and one TrainStatsWatch dropping INFO_KEY.
        changes = ChangeWatch()
        changes.start(ds_grpc.DatastoreServiceStub(ds_channel), ())
        watch = TrainStatsWatch(lambda: changes.drop(INFO_KEY))
        watch.start(stub, ())
        await asyncio.wait_for(asyncio.gather(changes.connected.wait(), watch.connected.wait()), WAIT)
        assert watch.stats == {t: {} for t in TRAINERS}
        version = watch.version
        changes.put(INFO_KEY, changes.token(), b'{"kept": true}')
        changes.put("other", changes.token(), b"{}")
        assert changes.get(INFO_KEY) == b'{"kept": true}'

        # A one-epoch run: its stats are pushed (no polling of GetTrainStats), the kept /info/ goes.
        job = res.TrainingJob(trainer="trainers/segmentation", params=res.TrainingParams(max_epochs=1, val_split=0.0))
        await stub.CreateTrainingJob(pb.CreateTrainingJobRequest(training_job=job), timeout=30)
        pushed = await eventually(
            lambda: (watch.stats or {}).get("segmentation"), "pushed segmentation stats", timeout=300
        )
        assert watch.version > version
        assert changes.get(INFO_KEY) is None
        assert changes.get("other") == b"{}"  # only /info/ depends on train stats
        raw = await asyncio.wait_for(call.read(), WAIT)
        while not struct_to_dict(raw.train_stats["segmentation"]):
            raw = await asyncio.wait_for(call.read(), WAIT)
        call.cancel()
        assert struct_to_dict(raw.train_stats["segmentation"])["total_epochs"] == pushed["total_epochs"] == 1

        # The gateway's /info/ shows the stats GetTrainStats answers once the run ended.
        done = await eventually(
            lambda: watch.stats is not None and watch.stats["segmentation"].get("total_time"), "final stats", 300
        )
        assert done and watch.stats is not None
        final = struct_to_dict(
            (await stub.GetTrainStats(pb.GetTrainStatsRequest(trainer="trainers/segmentation"))).train_stats
        )
        assert watch.stats["segmentation"] == final

        async def info_stats() -> bool:
            async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
                answer = (await http.get("/info/")).json()
            return bool(answer["train_stats"]["segmentation"] == final)

        await eventually(info_stats, "/info/ with the final stats", WAIT)

        # Stopping the service ends the stream; the watch then holds nothing (/info/ asks again).
        await asyncio.to_thread(stack.training.stop)
        await eventually(lambda: watch.stats is None, "the stream closed", WAIT)
        assert not watch.connected.is_set()
        await watch.stop()
        await changes.stop()
