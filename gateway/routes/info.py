"""MONAI Label's /info/ (`endpoints/info.py`): Slicer asks for it on connect and every 5 s
while training, so it must be cheap and must never lie.

- What changes rarely (app name and labels, models, trainers, strategies, scoring methods)
  is kept per gateway for `STATIC_TTL_SECONDS` and dropped at once by `invalidate_info`
  (called when this gateway changes models); a call pays only for what changes all the
  time: the datastore counts (one query) and the trainers' stats.
- MONAI Label answers /info/ only once its app is loaded, and Slicer caches an answer
  without models (and hides its panels). So a service in `info_wait_for` that has not
  answered yet is waited for, up to `info_timeout_seconds`, and then the answer is a 503
  with Retry-After, never a 200 with an empty section. A service that answered before and
  does not answer now gives its last answer (logged). A service not in `info_wait_for`
  (a stack without it) gives empty sections.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from labelgrid.activelearning.v1 import activelearning_service_pb2 as al_pb
from labelgrid.common.v1 import common_pb2
from labelgrid.inference.v1 import inference_service_pb2 as inf_pb
from labelgrid.inference.v1 import resources_pb2 as inf_res
from labelgrid.training.v1 import training_service_pb2 as train_pb

from gateway import __version__
from gateway.changes import INFO_KEY, TrainStatsWatch, change_watch, train_stats_watch
from gateway.errors import GatewayError
from gateway.routes.common import Ctx, CtxDep
from gateway.routes.datastore import datastore_stats
from services.common.protos import struct_to_dict

router = APIRouter(tags=["AppService"])
log = logging.getLogger("labelgrid.gateway")

STATIC_TTL_SECONDS = 5.0
"""How long app info, models, trainers and strategies are reused before they are asked again."""
TRAIN_STATS_TTL_SECONDS = 1.0
"""How long the trainers' stats are reused (Slicer polls every 5 s while training)."""
RETRY_AFTER_SECONDS = 2
"""Retry-After of the 503 while a service /info/ needs is starting."""


def labels_json(labels: Mapping[str, int], as_list: bool) -> list[str] | dict[str, int]:
    """MONAI Label's labels: a list (indices = positions + 1) or a dict name -> idx, by index."""
    ordered = sorted(labels.items(), key=lambda item: (item[1], item[0]))
    return [name for name, _ in ordered] if as_list else dict(ordered)


def config_value(value: common_pb2.ConfigValue) -> Any:
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "choice_value":
        return list(value.choice_value.options)
    return getattr(value, kind)


def model_json(model: inf_res.Model) -> dict[str, Any]:
    """InferTask.info() as MONAI Label's /info shows it."""
    type_name = inf_res.InferType.Name(model.type).removeprefix("INFER_TYPE_").lower()
    return {
        "type": "segmentation" if type_name == "unspecified" else type_name,
        "labels": labels_json(model.labels, model.labels_as_list),
        "dimension": model.dimension or 3,
        "description": model.description,
        "config": {entry.key: config_value(entry.value) for entry in model.config},
    }


# -- the parts, one fetcher per service ---------------------------------------------------


def _call_options(ctx: Ctx, service: str) -> dict[str, Any]:
    # wait_for_ready: a service /info/ needs that is starting (connection refused) is waited
    # for until the deadline instead of failing at once; one it can do without is not.
    return {
        "timeout": ctx.settings.info_timeout_seconds,
        "metadata": ctx.metadata,
        "wait_for_ready": service in ctx.settings.info_wait_for,
    }


async def _inference_part(ctx: Ctx) -> dict[str, Any]:
    """App name, description, version, labels and the models."""
    opts = _call_options(ctx, "inference")
    info, listing = await asyncio.gather(
        ctx.clients.inference.GetAppInfo(inf_pb.GetAppInfoRequest(), **opts),
        ctx.clients.inference.ListModels(inf_pb.ListModelsRequest(), **opts),
    )
    return {
        "name": info.display_name or ctx.settings.app_name,
        "description": info.description,
        "version": info.version or __version__,
        "labels": labels_json(info.labels, info.labels_as_list),
        "models": {model.model_id: model_json(model) for model in listing.models},
    }


async def _training_part(ctx: Ctx) -> dict[str, Any]:
    """The trainers (their stats are asked on every call, see _train_stats)."""
    listing = await ctx.clients.training.ListTrainers(train_pb.ListTrainersRequest(), **_call_options(ctx, "training"))
    trainers: dict[str, Any] = {}
    names: dict[str, str] = {}
    for trainer in listing.trainers:
        entry: dict[str, Any] = {
            "description": trainer.description,
            "config": {item.key: config_value(item.value) for item in trainer.config},
        }
        if trainer.labels:
            entry["labels"] = dict(sorted(trainer.labels.items(), key=lambda item: item[1]))
        trainers[trainer.trainer_id] = entry
        names[trainer.trainer_id] = trainer.name
    return {"trainers": trainers, "_trainer_names": names}


async def _activelearning_part(ctx: Ctx) -> dict[str, Any]:
    opts = _call_options(ctx, "activelearning")
    strategies, methods = await asyncio.gather(
        ctx.clients.activelearning.ListStrategies(al_pb.ListStrategiesRequest(), **opts),
        ctx.clients.activelearning.ListScoringMethods(al_pb.ListScoringMethodsRequest(), **opts),
    )
    return {
        "strategies": {s.strategy_id: {"description": s.description} for s in strategies.strategies},
        "scoring": {m.method_id: {"description": m.description} for m in methods.scoring_methods},
    }


_FETCHERS: dict[str, Callable[[Ctx], Awaitable[dict[str, Any]]]] = {
    "inference": _inference_part,
    "training": _training_part,
    "activelearning": _activelearning_part,
}


def _empty(service: str, ctx: Ctx) -> dict[str, Any]:
    """The sections of a service the stack does not have."""
    if service == "inference":
        return {
            "name": ctx.settings.app_name,
            "description": ctx.settings.app_description,
            "version": __version__,
            "labels": [],
            "models": {},
        }
    if service == "training":
        return {"trainers": {}, "_trainer_names": {}}
    return {"strategies": {}, "scoring": {}}


# -- the cache ------------------------------------------------------------------------------


@dataclass
class _Part:
    value: dict[str, Any] | None = None
    fetched_at: float = float("-inf")
    answered: bool = False  # the service answered at least once


@dataclass
class InfoCache:
    """One gateway's rarely-changing parts of /info/, plus the last train stats."""

    parts: dict[str, _Part] = field(default_factory=lambda: {s: _Part() for s in _FETCHERS})
    train_stats: dict[str, Any] = field(default_factory=dict)
    train_stats_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    generation: int = 0

    def invalidate(self) -> None:
        self.generation += 1
        self.train_stats_at = float("-inf")
        for part in self.parts.values():
            part.fetched_at = float("-inf")


def info_cache(request: Request) -> InfoCache:
    return info_cache_of(request.app)


def info_cache_of(app: Any) -> InfoCache:
    state = app.state
    cache = getattr(state, "info_cache", None)
    if cache is None:
        cache = state.info_cache = InfoCache()
    return cache


def invalidate_info(request: Request) -> None:
    """Drops the cached parts (models, trainers, ...): call after changing them through this gateway."""
    info_cache(request).invalidate()


class _NotReady(Exception):
    def __init__(self, service: str, err: grpc.aio.AioRpcError) -> None:
        super().__init__(service)
        self.service = service
        self.err = err


async def _refresh(ctx: Ctx, cache: InfoCache, service: str, required: bool) -> None:
    part = cache.parts[service]
    generation = cache.generation
    try:
        value = await _FETCHERS[service](ctx)
    except grpc.aio.AioRpcError as err:
        if part.answered:
            log.warning(
                "%s service did not answer /info/: its last answer is used",
                service,
                extra={"code": err.code().name},
            )
            return
        if required:
            raise _NotReady(service, err) from None
        part.value = _empty(service, ctx)
        part.fetched_at = time.monotonic()
        return
    if generation == cache.generation:  # not invalidated meanwhile
        part.value, part.answered, part.fetched_at = value, True, time.monotonic()


async def _static_parts(ctx: Ctx, cache: InfoCache) -> dict[str, dict[str, Any]]:
    required = set(ctx.settings.info_wait_for)
    now = time.monotonic()
    stale = [s for s, p in cache.parts.items() if p.value is None or now - p.fetched_at > STATIC_TTL_SECONDS]
    if stale:
        async with cache.lock:  # one refresh at a time; the others reuse its result
            now = time.monotonic()
            stale = [
                s for s in stale if cache.parts[s].value is None or now - cache.parts[s].fetched_at > STATIC_TTL_SECONDS
            ]
            results = await asyncio.gather(
                *(_refresh(ctx, cache, s, s in required) for s in stale), return_exceptions=True
            )
        not_ready = [r for r in results if isinstance(r, _NotReady)]
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, _NotReady):
                raise result
        if not_ready:
            names = ", ".join(sorted(r.service for r in not_ready))
            log.warning("/info/ while services start", extra={"services": names})
            raise GatewayError(
                503,
                f"the app is not ready yet: no answer from the {names} service "
                f"within {ctx.settings.info_timeout_seconds:g} s",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
    return {s: p.value or _empty(s, ctx) for s, p in cache.parts.items()}


async def _train_stats(
    ctx: Ctx, cache: InfoCache, names: Mapping[str, str], pushed: dict[str, dict[str, Any]] | None
) -> dict[str, Any]:
    """Every trainer's stats (Slicer follows training through them): as the training service
    last pushed them (gateway.changes.TrainStatsWatch); while that stream is down, asked again
    when the last answer is older than TRAIN_STATS_TTL_SECONDS, so a crowd of pollers costs
    one call."""
    if not names:
        return {}
    if pushed is not None:
        return {t: pushed.get(t, {}) for t in names}
    if time.monotonic() - cache.train_stats_at <= TRAIN_STATS_TTL_SECONDS and set(cache.train_stats) == set(names):
        return cache.train_stats
    try:
        answers = await asyncio.gather(
            *(
                ctx.clients.training.GetTrainStats(
                    train_pb.GetTrainStatsRequest(trainer=name), **_call_options(ctx, "training")
                )
                for name in names.values()
            )
        )
    except grpc.aio.AioRpcError as err:
        log.warning(
            "training service did not answer /info/: the last train stats are used",
            extra={"code": err.code().name},
        )
        return {t: cache.train_stats.get(t, {}) for t in names}
    stats = {t: struct_to_dict(a.train_stats) for t, a in zip(names, answers, strict=True)}
    cache.train_stats, cache.train_stats_at = stats, time.monotonic()
    return stats


async def _parts_and_train_stats(
    ctx: Ctx, cache: InfoCache, stats_watch: TrainStatsWatch
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    parts = await _static_parts(ctx, cache)
    return parts, await _train_stats(ctx, cache, parts["training"]["_trainer_names"], stats_watch.stats)


def _expires(cache: InfoCache, pushed: bool) -> float:
    """When a kept /info/ answer is too old: its oldest part, the train stats unless they
    are pushed (a push drops the answer)."""
    parts = min((part.fetched_at for part in cache.parts.values()), default=float("-inf"))
    trainers = (cache.parts["training"].value or {}).get("_trainer_names")
    train = cache.train_stats_at if trainers and not pushed else float("inf")
    return min(parts + STATIC_TTL_SECONDS, train + TRAIN_STATS_TTL_SECONDS)


@router.get("/info/", summary="Get App Info")
async def app_info(request: Request, ctx: Ctx = CtxDep) -> JSONResponse:
    return await _answer(ctx, request.app)


async def _answer(ctx: Ctx, app: Any) -> JSONResponse:
    """/info/, kept (gateway.changes) until the datastore or the train stats change; once its
    parts are older than their TTL it is still served while this runs again in the
    background, so no caller waits on the services after the first."""
    cache = info_cache_of(app)
    watch = change_watch(app)
    stats_watch = train_stats_watch(app)
    stats_watch.start(ctx.clients.training, ctx.service_metadata)
    generation, stats_version = cache.generation, stats_watch.version
    (parts, train_stats), (stats, token) = await asyncio.gather(
        _parts_and_train_stats(ctx, cache, stats_watch), datastore_stats(ctx, watch)
    )
    inference, training, activelearning = (parts["inference"], parts["training"], parts["activelearning"])
    # No top-level "config" key: Slicer refuses servers that send one.
    response = JSONResponse(
        {
            "name": inference["name"],
            "description": inference["description"],
            "version": inference["version"],
            "labels": inference["labels"],
            "models": inference["models"],
            "trainers": training["trainers"],
            "strategies": activelearning["strategies"],
            "scoring": activelearning["scoring"],
            "train_stats": train_stats,
            "datastore": stats,
        }
    )
    # Kept unless a model changed or new train stats came meanwhile.
    if generation == cache.generation and stats_version == stats_watch.version:
        pushed = stats_watch.stats is not None
        watch.put(
            INFO_KEY,
            token,
            bytes(response.body),
            expires=_expires(cache, pushed),
            refresh=lambda: _answer(ctx, app),
        )
    return response
