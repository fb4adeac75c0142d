"""gateway.routes.common.read_ahead: a download's chunks read ahead of the sender, in order,
errors where they happened, and the source closed when the sender stops early."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.routes.common import read_ahead


async def test_chunks_in_order_and_errors_after_what_came_before() -> None:
    async def source() -> AsyncIterator[bytes]:
        for n in range(10):
            yield bytes([n]) * 3
        raise RuntimeError("the service went away")

    got = []
    with pytest.raises(RuntimeError, match="went away"):
        async for chunk in read_ahead(source(), depth=2):
            got.append(chunk)
    assert got == [bytes([n]) * 3 for n in range(10)]


async def test_a_sender_that_stops_early_closes_the_source() -> None:
    closed = asyncio.Event()
    produced = 0

    async def source() -> AsyncIterator[bytes]:
        nonlocal produced
        try:
            while True:
                produced += 1
                yield b"x"
        finally:
            closed.set()  # the gateway's Download.chunks() cancels its call here

    stream = read_ahead(source(), depth=3)
    assert await anext(stream) == b"x"
    await stream.aclose()  # the client went away
    await asyncio.wait_for(closed.wait(), 10)
    assert produced <= 1 + 3 + 1  # never more than the read-ahead depth past what was sent
