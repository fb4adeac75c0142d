"""Answers kept in the gateway until the datastore says they changed: the hot read routes
(`GET /datastore/` stats, `GET /info/`) cost no backend call while nothing changes.

- **Pushed, not polled.** One `WatchChanges` stream per gateway (a server stream from the
  datastore) brings the datastore's change generation: its first message at once, then one
  after each write to images, labels or their info. An answer is kept as its encoded JSON
  bytes under the token (generation, local writes) read *before* it was fetched, and served
  only while the token is still current, so an answer that may predate a write is never
  served after the write was announced.
- **Read your writes.** Every request through this gateway that may write (anything but
  GET, HEAD and OPTIONS) bumps a local counter when it ends, so a client that wrote and
  then reads never gets an answer kept from before its write, even if the push is still
  on its way. Writes made elsewhere (another gateway, a background job) are seen once the
  push arrives, a few milliseconds later.
- **Fails to fetching.** While the stream is down (datastore restarting, not yet
  connected) or the datastore is not `exclusive` (replicas sharing PostgreSQL, where
  writes of other replicas are unseen), nothing is kept and every call asks the datastore,
  as before. The stream reconnects with a backoff.
- **Train stats are pushed too.** /info/ carries every trainer's stats; one
  `WatchTrainStats` stream per gateway (a server stream from the training service) brings
  them at once and after every change (`TrainStatsWatch`), and a change drops the kept
  /info/ answer. While that stream is down (or the training service predates it), /info/
  asks GetTrainStats again at most once a second and keeps its answer that long.
- **The route itself.** `HotReadMiddleware`, inside the auth middleware (roles are checked
  first) and outside FastAPI, answers a kept answer with the bytes and two headers: no
  routing, dependency, validation or serialization. A miss goes to the route, which fills
  the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.training.v1 import training_service_pb2 as train_pb
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.protos import struct_to_dict

log = logging.getLogger("labelgrid.gateway")

Token = tuple[int, int, int]
"""(stream number, the datastore's generation, this gateway's local write count) an answer was
read under; the stream number tells apart generations of a restarted datastore."""

RECONNECT_SECONDS = (0.25, 0.5, 1.0, 2.0)
"""Waits before reconnecting a broken WatchChanges stream (the last one repeats)."""

INFO_KEY = "info"
"""Key of the kept GET /info/ answer (gateway.routes.info)."""

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_JSON_HEADERS = [(b"content-type", b"application/json")]


STALE_LIMIT_SECONDS = 30.0
"""A kept answer with a refresh is served at most this long past its expiry while the refresh
runs (a refresh that fails drops it at once)."""


@dataclass
class _Kept:
    token: Token
    body: bytes
    expires: float  # time.monotonic() after which it is fetched again (inf: only on change)
    # Rebuilds and puts the answer again; with it, an expired answer is still served (for at
    # most STALE_LIMIT_SECONDS) while this runs in the background: no caller waits for it.
    refresh: Callable[[], Awaitable[Any]] | None = None


class ChangeWatch:
    """The datastore's change generation as last pushed, and the answers kept under it."""

    def __init__(self) -> None:
        self.generation: int | None = None  # None: no open stream, or not exclusive
        self.local_writes = 0
        self.streams = 0  # streams opened so far
        self._kept: dict[str, _Kept] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()  # set while the stream is open (tests wait on it)

    # -- the token and the kept answers ------------------------------------------------

    def token(self) -> Token | None:
        """What an answer fetched now is valid under; None: do not keep it."""
        if self.generation is None:
            return None
        return (self.streams, self.generation, self.local_writes)

    def get(self, key: str) -> bytes | None:
        kept = self._kept.get(key)
        if kept is None or kept.token != self.token():
            return None
        now = time.monotonic()
        if now > kept.expires:
            if kept.refresh is None or now > kept.expires + STALE_LIMIT_SECONDS:
                return None
            self._start_refresh(key, kept.refresh)
        return kept.body

    def put(
        self,
        key: str,
        token: Token | None,
        body: bytes,
        expires: float = float("inf"),
        refresh: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        """Keeps `body` if it was read under `token` (taken before the fetch) and that is
        still the current one. With `refresh`, an expired `body` is served while `refresh()`
        (which puts the new answer) runs in the background."""
        if token is not None and token == self.token():
            self._kept[key] = _Kept(token, body, expires, refresh)

    def _start_refresh(self, key: str, refresh: Callable[[], Awaitable[Any]]) -> None:
        if key in self._refreshing:
            return

        async def run() -> None:
            try:
                await refresh()
            except Exception as err:  # noqa: BLE001 - the next call fetches it the usual way
                self._kept.pop(key, None)
                log.info("refreshing a kept answer failed: it is fetched again", extra={"key": key, "error": str(err)})
            finally:
                self._refreshing.pop(key, None)

        self._refreshing[key] = asyncio.get_running_loop().create_task(run())

    def drop(self, key: str) -> None:
        """Forgets the answer kept under `key` (what it was derived from changed)."""
        self._kept.pop(key, None)

    def wrote(self) -> None:
        """A request through this gateway that may have written has ended."""
        self.local_writes += 1
        self._kept.clear()

    def _set_generation(self, generation: int | None) -> None:
        if generation != self.generation:
            self._kept.clear()
        self.generation = generation

    # -- the stream ----------------------------------------------------------------------

    def start(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        """Opens the stream in the background (once; later calls do nothing)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(stub, metadata))

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._set_generation(None)
        for refreshing in list(self._refreshing.values()):
            refreshing.cancel()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        def on_message(message: ds_pb.WatchChangesResponse) -> None:
            self._set_generation(message.generation if message.exclusive else None)
            self.connected.set()

        def on_closed() -> None:
            self.connected.clear()
            self._set_generation(None)

        def open_call() -> Any:
            self.streams += 1
            return stub.WatchChanges(ds_pb.WatchChangesRequest(), metadata=metadata)

        await follow_stream(
            open_call, on_message, on_closed, "datastore change stream closed: answers are fetched until it reconnects"
        )


async def follow_stream(
    open_call: Callable[[], Any],
    on_message: Callable[[Any], None],
    on_closed: Callable[[], None],
    closed_log: str,
) -> None:
    """Reads a server stream for ever: each message to `on_message`; when it ends or fails,
    `on_closed`, one log line (not one per failed retry), and a reopen after a growing pause."""
    failures = 0
    while True:
        call = open_call()
        try:
            async for message in call:
                on_message(message)
                failures = 0
            code = "OK"  # the server ended it (it is stopping)
        except grpc.aio.AioRpcError as err:
            code = err.code().name
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            on_closed()
        if failures == 0:
            log.info(closed_log, extra={"code": code})
        await asyncio.sleep(RECONNECT_SECONDS[min(failures, len(RECONNECT_SECONDS) - 1)])
        failures += 1


class TrainStatsWatch:
    """Every trainer's stats as the training service last pushed them (WatchTrainStats)."""

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self.stats: dict[str, dict[str, Any]] | None = None  # None: no open stream
        self.version = 0  # bumped whenever `stats` changes (or the stream opens or closes)
        self.on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()  # set while the stream is open (tests wait on it)

    def _set(self, stats: dict[str, dict[str, Any]] | None) -> None:
        if stats != self.stats:
            self.stats = stats
            self.version += 1
            self.on_change()

    def start(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        """Opens the stream in the background (once; later calls do nothing)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(stub, metadata))

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._set(None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        def on_message(message: train_pb.WatchTrainStatsResponse) -> None:
            self._set({trainer: struct_to_dict(stats) for trainer, stats in message.train_stats.items()})
            self.connected.set()

        def on_closed() -> None:
            self.connected.clear()
            self._set(None)

        await follow_stream(
            lambda: stub.WatchTrainStats(train_pb.WatchTrainStatsRequest(), metadata=metadata),
            on_message,
            on_closed,
            "training stats stream closed: /info/ asks for train stats until it reconnects",
        )


def train_stats_watch(app: Any) -> TrainStatsWatch:
    """The app's TrainStatsWatch (made on first use; the stream opens on the first /info/);
    a change drops the kept answer under `INFO_KEY`."""
    watch = getattr(app.state, "train_stats_watch", None)
    if watch is None:
        changes = change_watch(app)
        watch = app.state.train_stats_watch = TrainStatsWatch(lambda: changes.drop(INFO_KEY))
    return watch


def change_watch(app: Any) -> ChangeWatch:
    """The app's ChangeWatch (made on first use; the stream opens on the first hot read)."""
    watch = getattr(app.state, "change_watch", None)
    if watch is None:
        watch = app.state.change_watch = ChangeWatch()
    return watch


async def stop_change_watch(app: Any) -> None:
    for name in ("train_stats_watch", "change_watch"):
        watch = getattr(app.state, name, None)
        if watch is not None:
            await watch.stop()


@dataclass(frozen=True)
class _HotRoute:
    """What the router leaves in scope["route"], as far as gateway.metrics reads it."""

    path: str


class HotReadMiddleware:
    """Serves kept answers of `hot` routes ({(path, query string): cache key}) straight from
    bytes, and tells the ChangeWatch when a request that may write has ended."""

    def __init__(self, app: ASGIApp, hot: dict[tuple[str, bytes], str]) -> None:
        self.app = app
        self.hot = hot
        self.watch: ChangeWatch | None = None
        self._routes = {path: _HotRoute(path) for path, _query in hot}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        watch = self.watch
        if watch is None:
            watch = self.watch = change_watch(scope["app"])
        method = scope["method"]
        if method == "GET":
            key = self.hot.get((scope["path"], scope["query_string"]))
            if key is not None:
                body = watch.get(key)
                if body is not None:
                    # The route's template for the metrics (no regex scan of every route).
                    scope["route"] = self._routes.get(scope["path"])
                    await send({
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())],
                    })  # fmt: skip
                    await send({"type": "http.response.body", "body": body})
                    return
            await self.app(scope, receive, send)
            return
        if method in _SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            watch.wrote()
