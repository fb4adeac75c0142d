"""MONAI Label's /info/ (`endpoints/info.py`): app and models from the inference service,
counts from the datastore. Cheap: a few small calls, run concurrently."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import grpc
from fastapi import APIRouter
from labelgrid.common.v1 import common_pb2
from labelgrid.inference.v1 import inference_service_pb2 as inf_pb
from labelgrid.inference.v1 import resources_pb2 as inf_res

from gateway import __version__
from gateway.routes.activelearning import info_parts
from gateway.routes.common import Ctx, CtxDep
from gateway.routes.datastore import datastore_stats
from gateway.routes.train import trainers_info

router = APIRouter(tags=["AppService"])
log = logging.getLogger("labelgrid.gateway")


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


async def _app_and_models(ctx: Ctx) -> tuple[dict[str, Any], dict[str, Any]]:
    """Name, labels and models from the inference service; defaults when it does not answer."""
    app: dict[str, Any] = {
        "name": ctx.settings.app_name,
        "description": ctx.settings.app_description,
        "version": __version__,
        "labels": [],
    }
    timeout = ctx.settings.info_timeout_seconds
    try:
        info, listing = await asyncio.gather(
            ctx.clients.inference.GetAppInfo(
                inf_pb.GetAppInfoRequest(), timeout=timeout, metadata=ctx.metadata
            ),
            ctx.clients.inference.ListModels(
                inf_pb.ListModelsRequest(), timeout=timeout, metadata=ctx.metadata
            ),
        )
    except grpc.aio.AioRpcError as err:
        log.warning(
            "inference service did not answer /info/", extra={"code": err.code().name}
        )
        return app, {}
    app.update(
        name=info.display_name or app["name"],
        description=info.description,
        version=info.version or app["version"],
        labels=labels_json(info.labels, info.labels_as_list),
    )
    return app, {model.model_id: model_json(model) for model in listing.models}


@router.get("/info/", summary="Get App Info")
async def app_info(ctx: Ctx = CtxDep) -> dict[str, Any]:
    # No top-level "config" key: Slicer refuses servers that send one.
    (app, models), stats, (trainers, train_stats), (strategies, scoring) = await asyncio.gather(
        _app_and_models(ctx), datastore_stats(ctx), trainers_info(ctx), info_parts(ctx)
    )
    return {
        **app,
        "models": models,
        "trainers": trainers,
        "strategies": strategies,
        "scoring": scoring,
        "train_stats": train_stats,
        "datastore": stats,
    }
