"""A kept hot answer (gateway.changes.HotReadMiddleware) is counted by the metrics under its
route's template, as the routed call is, without matching the path against every route."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
from starlette.types import Receive, Scope, Send

from gateway.changes import ChangeWatch, HotReadMiddleware
from gateway.metrics import GatewayMetrics, MetricsMiddleware


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
