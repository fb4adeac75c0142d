"""The images a batch inference runs on, from the datastore service (ImageLister)."""

from __future__ import annotations

from typing import Any

from labelgrid.datastore.v1 import datastore_service_pb2 as ds

from services.common.datastore_client import DatastoreClient

_FILTERS = {
    "ALL": ds.IMAGE_FILTER_UNSPECIFIED,
    "LABELED": ds.IMAGE_FILTER_LABELED,
    "UNLABELED": ds.IMAGE_FILTER_UNLABELED,
}


class DatastoreImages:
    """Labeled / unlabeled means with / without a final label, as MONAI Label's batch infer."""

    def __init__(self, datastore: DatastoreClient | Any) -> None:
        self.datastore = datastore

    async def image_ids(self, image_filter: str) -> list[str]:
        images = await self.datastore.list_images(filter=_FILTERS[image_filter], label_tag="final")
        return [image.image_id for image in images]  # sessions are not images: nothing to leave out
