"""Kept hot answers (gateway.changes): counted by the metrics under their route's template
without matching the path against every route; an expired one with a refresh is served while
the refresh runs in the background (so /info/ callers never wait on the services)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import httpx
from starlette.types import Receive, Scope, Send

from gateway.changes import STALE_LIMIT_SECONDS, ChangeWatch, HotReadMiddleware
from gateway.metrics import GatewayMetrics, MetricsMiddleware
from tests.fixtures.polling import eventually


async def test_a_kept_answer_is_counted_under_its_route() -> None:
    routed: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:  # the routed app: a miss
        routed.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    watch = ChangeWatch()
    watch._set_generation(7)  # as the first WatchChanges message does
    watch.put("stats", watch.token(), b'{"total": 3}')
    metrics = GatewayMetrics()
    hot = HotReadMiddleware(inner, hot={("/datastore/", b""): "stats"})
    hot.watch = watch
    app = MetricsMiddleware(hot, metrics=metrics, routes_app=SimpleNamespace(router=SimpleNamespace(routes=[])))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        kept = await http.get("/datastore/")
        assert kept.json() == {"total": 3} and kept.headers["content-length"] == "12"
        assert routed == []  # answered from the kept bytes
        watch.wrote()  # a write through this gateway: the next call goes to the route
        assert (await http.get("/datastore/")).json() == {}
        assert routed == ["/datastore/"]
    value = metrics.requests.labels("GET", "/datastore/", "200")._value.get()
    assert value == 1  # the kept answer; the routed call has no scope["route"] here (no router)


async def test_an_expired_answer_with_a_refresh_is_served_while_it_refreshes() -> None:
    watch = ChangeWatch()
    watch._set_generation(1)
    gate = asyncio.Event()
    refreshes = 0

    async def refresh() -> None:
        nonlocal refreshes
        refreshes += 1
        token = watch.token()
        await gate.wait()  # the services answering
        watch.put("info", token, b"new", expires=float("inf"), refresh=refresh)

    past = time.monotonic() - 1  # expired already
    watch.put("info", watch.token(), b"old", expires=past, refresh=refresh)
    assert watch.get("info") == b"old"  # no caller waits: the old answer, one refresh started
    assert watch.get("info") == b"old"
    await eventually(lambda: refreshes == 1, "the refresh running")
    gate.set()
    await eventually(lambda: watch.get("info") == b"new", "the refreshed answer")
    assert refreshes == 1

    # A refresh that fails drops the answer: the next call goes to the route.
    async def failing() -> None:
        raise RuntimeError("the inference service is gone")

    watch.put("info", watch.token(), b"old", expires=past, refresh=failing)
    assert watch.get("info") == b"old"
    await eventually(lambda: watch.get("info") is None, "the answer dropped")

    # Without a refresh, or past the stale limit, an expired answer is never served.
    watch.put("plain", watch.token(), b"x", expires=past)
    assert watch.get("plain") is None
    watch.put("info", watch.token(), b"old", expires=past - STALE_LIMIT_SECONDS, refresh=refresh)
    assert watch.get("info") is None
    # A change of the datastore's generation drops it whatever its refresh.
    watch.put("info", watch.token(), b"old", expires=float("inf"), refresh=refresh)
    watch._set_generation(2)
    assert watch.get("info") is None
    await watch.stop()
