"""MONAI Label's routers labelgrid does not serve yet: 501 with a clear message, not 404,
so that clients and people see the route exists but is not wired up."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.errors import GatewayError

router = APIRouter()

_ROUTES: list[tuple[str, list[str], str]] = [
    ("/infer/wsi/{model}", ["POST"], "Infer"),
    ("/infer/wsi_v2/{model}", ["POST"], "Infer"),
    ("/reload", ["POST"], "AppService"),
]


async def not_available(request: Request) -> None:
    raise GatewayError(501, f"{request.method} {request.url.path} is not available yet in labelgrid")


for _path, _methods, _tag in _ROUTES:
    for _method in _methods:
        router.add_api_route(
            _path,
            not_available,
            methods=[_method],
            tags=[_tag],
            summary="Not available yet in labelgrid",
            operation_id=f"{_method.lower()}_{_path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
        )
