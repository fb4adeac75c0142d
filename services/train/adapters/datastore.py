"""The datastore calls training needs beyond the shared client's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from labelgrid.datastore.v1 import datastore_service_pb2 as ds

from services.common.datastore_client import MODEL_VERSION, DatastoreClient
from services.common.errors import ErrorKind, LabelgridError


class TrainingDatastore:
    """`DatastorePort` over the shared DatastoreClient."""

    def __init__(self, client: DatastoreClient):
        self.client = client

    async def serving_version(self, model: str) -> str | None:
        return await self.client.serving_version(model)

    async def download_model_version(self, model: str, version: str, dest_dir: Path) -> Path:
        return await self.client.download_model_version(model, version, dest_dir)

    async def upload_model_version(
        self, model: str, path: Path, *, metrics: dict[str, Any], info: dict[str, Any], version: str = ""
    ) -> Any:
        return await self.client.upload_model_version(model, path, metrics=metrics, info=info, version=version)

    async def model_version_exists(self, model: str, version: str) -> bool:
        request = ds.GetModelVersionRequest(name=MODEL_VERSION.format(model, version))
        try:
            await self.client.call(
                f"looking up version {version!r} of model {model!r}",
                lambda: self.client.stub.GetModelVersion(request, timeout=self.client.timeout),
            )
        except LabelgridError as error:
            if error.kind in (ErrorKind.NOT_FOUND, ErrorKind.INVALID_ARGUMENT):
                return False
            raise
        return True
