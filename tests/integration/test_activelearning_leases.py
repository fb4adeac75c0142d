"""Next sample with leases: the active learning service against a real datastore, both on
loopback, with ten annotators (threads, each with its own channel and client id) at once.

No mocks: leases, labels and info go through the datastore's gRPC API.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from labelgrid.activelearning.v1 import activelearning_service_pb2 as pb
from labelgrid.activelearning.v1 import activelearning_service_pb2_grpc as pb_grpc
from labelgrid.datastore.v1 import datastore_service_pb2 as ds

from services.activelearning.service import start_service
from tests.contract.helpers import error_reason, nifti_bytes, upload_image, upload_label
from tests.fixtures.activelearning import Stack, start_stack, stop_stack
from tests.fixtures.polling import eventually

CLIENTS = 10


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    running = await start_stack(tmp_path)
    yield running
    await stop_stack(running)


async def add_images(stack: Stack, count: int) -> list[str]:
    ids = [f"img_{n:03d}" for n in range(count)]
    for n, image_id in enumerate(ids):
        await upload_image(stack.ds_stub, nifti_bytes((8, 8, 8), seed=n), f"{image_id}.nii.gz", image_id)
    return ids


def _when(stamp: Any) -> datetime:
    return stamp.ToDatetime()


def annotate(address: str, client_id: str, rounds: int, save_every: int, ttl: int) -> list[dict[str, Any]]:
    """One annotator (its own thread and channel): asks for the next sample `rounds` times and
    saves a final label for every `save_every`-th image it gets (through the datastore)."""
    answers: list[dict[str, Any]] = []
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ActiveLearningServiceStub(channel)
        for round_ in range(rounds):
            response = stub.NextSample(
                pb.NextSampleRequest(strategy="strategies/first", client_id=client_id, lease_ttl_seconds=ttl),
                timeout=60,
            )
            if not response.HasField("image"):
                answers.append({"client": client_id, "image": None, "reason": response.no_sample_reason})
                continue
            answers.append(
                {
                    "client": client_id,
                    "image": response.image.image_id,
                    "acquire": _when(response.lease.acquire_time),
                    "expire": _when(response.lease.expire_time),
                    "save": save_every and round_ % save_every == save_every - 1,
                }
            )
    return answers


async def test_ten_annotators_at_once_get_the_first_ten_free_images(stack: Stack) -> None:
    ids = await add_images(stack, 14)
    with ThreadPoolExecutor(CLIENTS) as pool:
        loop = asyncio.get_running_loop()
        answers = await asyncio.gather(
            *(loop.run_in_executor(pool, annotate, stack.address, f"annotator-{n}", 1, 0, 600) for n in range(CLIENTS))
        )
    handed = [a[0]["image"] for a in answers]
    # MONAI Label's `first` gives all ten the same image; here each gets its own, the first ten.
    assert sorted(handed) == ids[:CLIENTS]
    leases = await stack.stub.ListLeases(pb.ListLeasesRequest(page_size=100))
    assert sorted(lease.image_id for lease in leases.leases) == ids[:CLIENTS]
    assert {lease.client_id for lease in leases.leases} == {f"annotator-{n}" for n in range(CLIENTS)}
    # The hand-out is recorded in the image info as MONAI Label records it.
    got = await stack.ds_stub.GetImage(ds.GetImageRequest(name=f"images/{ids[0]}"))
    marks = dict(got.image.info["strategy"])
    assert set(marks) == {"first"} and marks["first"]["client_id"].startswith("annotator-")


async def test_no_image_is_ever_under_two_live_leases_and_saved_images_never_come_back(stack: Stack) -> None:
    ids = await add_images(stack, 16)
    labeled: set[str] = set()
    label_bytes = nifti_bytes((8, 8, 8), seed=99, dtype="uint8")
    rounds = 6
    all_answers: list[dict[str, Any]] = []

    # Each round: the ten annotators ask at once; afterwards the ones whose turn it is save a
    # final label for the image they hold (this ends their lease in the datastore).
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(CLIENTS) as pool:
        for round_ in range(rounds):
            answers = await asyncio.gather(
                *(
                    loop.run_in_executor(pool, annotate, stack.address, f"annotator-{n}", 1, 0, 600)
                    for n in range(CLIENTS)
                )
            )
            for n, (answer,) in enumerate(answers):
                answer["round"] = round_
                all_answers.append(answer)
                if answer["image"] is not None:
                    assert answer["image"] not in labeled, f"{answer['image']} was saved, yet handed out again"
                    if (n + round_) % 3 == 0:
                        await upload_label(
                            stack.ds_stub, answer["image"], label_bytes, info={"client_id": answer["client"]}
                        )
                        labeled.add(answer["image"])
                        answer["saved"] = True

    # A lease lives from its acquire time until the same client's next request (which ends it
    # in the same transaction as the next acquire), a save, or its expiry.
    by_client: dict[str, list[dict[str, Any]]] = {}
    for answer in all_answers:
        by_client.setdefault(answer["client"], []).append(answer)
    intervals: list[tuple[str, str, datetime, datetime]] = []
    for client, answers in by_client.items():
        answers.sort(key=lambda a: a["round"])
        for index, answer in enumerate(answers):
            if answer["image"] is None:
                continue
            later = [a for a in answers[index + 1 :] if a["image"] is not None]
            end = later[0]["acquire"] if later else answer["expire"]
            intervals.append((answer["image"], client, answer["acquire"], end))
    for image, client, start, end in intervals:
        for other_image, other_client, other_start, other_end in intervals:
            if image == other_image and client != other_client:
                assert end <= other_start or other_end <= start, (
                    f"{image} was under two live leases: {client} {start}-{end} and {other_client} {other_start}-{other_end}"
                )
    handed = [a for a in all_answers if a["image"] is not None]
    assert len({a["image"] for a in handed}) > CLIENTS  # the annotators moved on through the datastore
    assert labeled <= set(ids)
    # Everything left is either labeled or leased: nothing is handed out twice at once.
    leases = await stack.stub.ListLeases(pb.ListLeasesRequest(page_size=100))
    live = [lease.image_id for lease in leases.leases]
    assert len(live) == len(set(live))
    assert not set(live) & labeled


async def test_expired_leases_come_back_and_asking_again_releases_the_previous_one(stack: Stack) -> None:
    ids = await add_images(stack, 3)
    first = await stack.stub.NextSample(
        pb.NextSampleRequest(strategy="strategies/first", client_id="slow", lease_ttl_seconds=1)
    )
    assert first.image.image_id == ids[0]
    other = await stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/first", client_id="fast"))
    assert other.image.image_id == ids[1]

    async def lapsed() -> bool:
        held = await stack.stub.ListLeases(pb.ListLeasesRequest(client_id="slow"))  # lists live leases only
        return not held.leases

    await eventually(lapsed, "slow's one-second lease to lapse", timeout=30, interval=0.1)
    # slow's lease lapsed: the image is free again, and the lowest id goes first.
    again = await stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/first", client_id="third"))
    assert again.image.image_id == ids[0]
    with pytest.raises(grpc.aio.AioRpcError) as lapsed:
        await stack.stub.RenewLease(pb.RenewLeaseRequest(name=f"leases/{ids[0]}", client_id="slow"))
    assert lapsed.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(lapsed.value) == "LEASE_NOT_FOUND"

    # Renewing extends the lease; asking again under the same strategy releases the previous one.
    renewed = await stack.stub.RenewLease(
        pb.RenewLeaseRequest(name=f"leases/{ids[1]}", client_id="fast", ttl_seconds=900)
    )
    assert renewed.lease.expire_time.seconds > other.lease.expire_time.seconds - 600 + 800
    skipped = await stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/first", client_id="fast"))
    assert skipped.image.image_id == ids[1]  # first: the skipped image is still the first free one for "fast"
    mine = await stack.stub.ListLeases(pb.ListLeasesRequest(client_id="fast"))
    assert [lease.image_id for lease in mine.leases] == [ids[1]]
    # Random never hands out a leased image either; the third image is the only free one.
    rnd = await stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/random", client_id="r"))
    assert rnd.image.image_id == ids[2]
    assert "weight" in rnd.strategy_info.fields
    none_left = await stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/random", client_id="r2"))
    assert not none_left.HasField("image") and none_left.no_sample_reason == pb.NO_SAMPLE_REASON_ALL_LEASED

    # Release by the holder frees it; a client that holds no lease is told so.
    await stack.stub.ReleaseLease(pb.ReleaseLeaseRequest(name=f"leases/{ids[2]}", client_id="r"))
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stack.stub.ReleaseLease(pb.ReleaseLeaseRequest(name=f"leases/{ids[2]}", client_id="nobody"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(unknown.value) == "LEASE_NOT_FOUND"
    freed = await stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/random", client_id="r2"))
    assert freed.image.image_id == ids[2]


async def test_score_strategy_respects_leases_and_says_when_all_are_labeled(stack: Stack) -> None:
    ids = await add_images(stack, 3)
    for image_id, value in zip(ids, (0.1, 0.9, 0.5), strict=True):
        await stack.ds_stub.SetImageScore(
            ds.SetImageScoreRequest(name=f"images/{image_id}", score_key="epistemic_entropy", value=value)
        )
    got = [
        await stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/epistemic", client_id=f"c{n}"))
        for n in range(3)
    ]
    assert [g.image.image_id for g in got] == [ids[1], ids[2], ids[0]]
    assert got[0].strategy_info["epistemic_entropy"] == pytest.approx(0.9)
    # Sample and Lease are the service's own messages, filled from the datastore's image and lease.
    stored = (await stack.ds_stub.GetImage(ds.GetImageRequest(name=f"images/{ids[1]}"))).image
    sample, lease = got[0].image, got[0].lease
    assert sample.sha256 and (sample.file_name, sample.sha256) == (stored.file_name, stored.sha256)
    assert dict(sample.scores) == pytest.approx({"epistemic_entropy": 0.9}) and list(sample.label_tags) == []
    assert (lease.name, lease.image_id, lease.client_id, lease.strategy) == (
        f"leases/{ids[1]}",
        ids[1],
        "c0",
        "epistemic",
    )
    assert lease.acquire_time.ToDatetime() < lease.expire_time.ToDatetime()
    assert list((await stack.stub.ListLeases(pb.ListLeasesRequest(client_id="c0"))).leases) == [lease]
    label = nifti_bytes((8, 8, 8), seed=5, dtype="uint8")
    for image_id in ids:
        await upload_label(stack.ds_stub, image_id, label)
    # Saving a final label ended every lease.
    assert not (await stack.stub.ListLeases(pb.ListLeasesRequest())).leases
    done = await stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/first", client_id="c0"))
    assert not done.HasField("image") and done.no_sample_reason == pb.NO_SAMPLE_REASON_ALL_LABELED


async def test_bad_input_gets_precise_errors(stack: Stack) -> None:
    empty = await stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/first", client_id="c"))
    assert not empty.HasField("image") and empty.no_sample_reason == pb.NO_SAMPLE_REASON_EMPTY
    cases = [
        (
            stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/nope", client_id="c")),
            grpc.StatusCode.NOT_FOUND,
            "STRATEGY_NOT_FOUND",
        ),
        (
            stack.stub.NextSample(pb.NextSampleRequest(strategy="nope", client_id="c")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_INPUT",
        ),
        (
            stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/first")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_INPUT",
        ),
        (
            stack.stub.NextSample(
                pb.NextSampleRequest(strategy="strategies/first", client_id="c", lease_ttl_seconds=-5)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_INPUT",
        ),
        (
            stack.stub.ReleaseLease(pb.ReleaseLeaseRequest(name="leases/img_000", client_id="ghost")),
            grpc.StatusCode.NOT_FOUND,
            "LEASE_NOT_FOUND",
        ),
        (
            stack.stub.ReleaseLease(pb.ReleaseLeaseRequest(name="leases/../x", client_id="ghost")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_INPUT",
        ),
        (
            stack.stub.RenewLease(pb.RenewLeaseRequest(name="images/x", client_id="ghost")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_INPUT",
        ),
        (
            stack.stub.ListLeases(pb.ListLeasesRequest(page_token="garbage")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_INPUT",
        ),
    ]
    for call, code, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        assert failed.value.code() == code, failed.value.details()
        assert error_reason(failed.value) == reason
        assert "Traceback" not in (failed.value.details() or "")


async def test_leases_survive_a_restart_of_the_service(tmp_path: Path) -> None:
    stack = await start_stack(tmp_path)
    try:
        ids = await add_images(stack, 2)
        got = await stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/first", client_id="a"))
        assert got.image.image_id == ids[0]
        # Restart the active learning service against the same datastore.
        settings = stack.service.settings
        await stack.server.stop(0)
        await stack.channels[1].close()
        server, service = await start_service(settings.model_copy(update={"port": 0}))
        stack.server, stack.service = server, service
        channel = grpc.aio.insecure_channel(server.address)
        stack.channels[1] = channel
        stub = pb_grpc.ActiveLearningServiceStub(channel)
        leases = await stub.ListLeases(pb.ListLeasesRequest())
        assert [(lease.image_id, lease.client_id) for lease in leases.leases] == [(ids[0], "a")]
        other = await stub.NextSample(pb.NextSampleRequest(strategy="strategies/first", client_id="b"))
        assert other.image.image_id == ids[1]
    finally:
        await stop_stack(stack)


async def test_metrics_count_next_samples_and_leases(tmp_path: Path) -> None:
    stack = await start_stack(tmp_path, metrics_port=0, lease_gauge_seconds=0.1)
    try:
        await add_images(stack, 2)
        for client in ("a", "b", "c"):
            await stack.stub.NextSample(pb.NextSampleRequest(strategy="strategies/first", client_id=client))
        url = f"http://127.0.0.1:{stack.server.metrics_port}/metrics"

        async def scraped() -> str | None:
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
            return text if "labelgrid_activelearning_leases 2.0" in text else None

        text = await eventually(scraped, "the lease gauge at 2", timeout=10, interval=0.1)
    finally:
        await stop_stack(stack)
    assert 'labelgrid_activelearning_next_sample_total{outcome="leased",strategy="first"} 2.0' in text
    assert 'labelgrid_activelearning_next_sample_total{outcome="all_leased",strategy="first"} 1.0' in text
    assert "labelgrid_activelearning_leases 2.0" in text
    assert 'labelgrid_activelearning_scoring_jobs{state="RUNNING"} 0.0' in text
    assert 'labelgrid_activelearning_images_scored_total{method="epistemic",outcome="scored"} 0.0' in text


async def test_strategies_and_methods_are_listed(stack: Stack) -> None:
    strategies = await stack.stub.ListStrategies(pb.ListStrategiesRequest())
    methods = await stack.stub.ListScoringMethods(pb.ListScoringMethodsRequest())
    assert [s.strategy_id for s in strategies.strategies] == ["random", "first", "epistemic", "tta"]
    assert {m.method_id: list(m.score_keys) for m in methods.scoring_methods} == {
        "epistemic": ["epistemic_entropy"], "tta": ["tta_variance"], "dice": ["dice"],
    }  # fmt: skip
