"""The datastore's leases, scores and images, over gRPC (DatastoreClient's channel).

The only code of this service that knows the datastore's messages: it turns them into the
domain's values and back. Failures come back as domain errors with the datastore's reason
(LEASE_NOT_FOUND, IMAGE_NOT_FOUND, ...), via `DatastoreClient.call`.
"""

from __future__ import annotations

from datetime import UTC
from pathlib import Path
from typing import Any

from labelgrid.datastore.v1 import datastore_service_pb2 as ds
from labelgrid.datastore.v1 import resources_pb2 as ds_res

from services.activelearning.domain.model import Acquired, ImageEntry, Lease, LeasePage
from services.common.datastore_client import IMAGE, LEASE, DatastoreClient
from services.common.protos import dict_to_struct, struct_to_dict

_ORDERS = {"first": ds.IMAGE_ORDER_UNSPECIFIED, "random": ds.IMAGE_ORDER_RANDOM, "score": ds.IMAGE_ORDER_SCORE_DESC}
_REASONS = {
    ds.NO_IMAGE_REASON_EMPTY: "EMPTY",
    ds.NO_IMAGE_REASON_ALL_LABELED: "ALL_LABELED",
    ds.NO_IMAGE_REASON_ALL_LEASED: "ALL_LEASED",
}


def image_entry(image: ds_res.Image) -> ImageEntry:
    return ImageEntry(
        image_id=image.image_id,
        file_name=image.file_name,
        sha256=image.sha256,
        info=struct_to_dict(image.info),
        scores=dict(image.scores),
        label_tags=tuple(label.tag for label in image.labels),
    )


def lease_value(lease: ds_res.Lease) -> Lease:
    return Lease(
        image_id=lease.image_id,
        client_id=lease.client_id,
        strategy=lease.strategy,
        acquire_time=lease.acquire_time.ToDatetime(UTC),
        expire_time=lease.expire_time.ToDatetime(UTC),
    )


class DatastoreLeases:
    """`LeaseStore` over the datastore's gRPC API."""

    def __init__(self, client: DatastoreClient) -> None:
        self.client = client

    @property
    def _timeout(self) -> float:
        return self.client.timeout

    async def acquire(
        self, client_id: str, strategy: str, order: str, score_key: str, label_tag: str, ttl_seconds: int
    ) -> Acquired:
        request = ds.AcquireImageLeaseRequest(
            client_id=client_id, strategy=strategy, order=_ORDERS[order], score_key=score_key,
            label_tag=label_tag, ttl_seconds=ttl_seconds,
        )  # fmt: skip
        stub = self.client.stub
        response = await self.client.call(
            f"leasing the next image for {client_id!r}", lambda: stub.AcquireImageLease(request, timeout=self._timeout)
        )
        if not response.HasField("image"):
            return Acquired(no_image_reason=_REASONS.get(response.no_image_reason, "ALL_LEASED"))
        return Acquired(image_entry(response.image), lease_value(response.lease))

    async def renew(self, image_id: str, client_id: str, ttl_seconds: int) -> Lease:
        request = ds.RenewImageLeaseRequest(name=LEASE.format(image_id), client_id=client_id, ttl_seconds=ttl_seconds)
        stub = self.client.stub
        response = await self.client.call(
            f"renewing the lease on {image_id!r}", lambda: stub.RenewImageLease(request, timeout=self._timeout)
        )
        return lease_value(response.lease)

    async def release(self, image_id: str, client_id: str) -> None:
        request = ds.ReleaseImageLeaseRequest(name=LEASE.format(image_id), client_id=client_id)
        stub = self.client.stub
        await self.client.call(
            f"releasing the lease on {image_id!r}", lambda: stub.ReleaseImageLease(request, timeout=self._timeout)
        )

    async def list_leases(self, client_id: str, page_size: int, page_token: str) -> LeasePage:
        request = ds.ListImageLeasesRequest(client_id=client_id, page_size=page_size, page_token=page_token)
        stub = self.client.stub
        response = await self.client.call(
            "listing leases", lambda: stub.ListImageLeases(request, timeout=self._timeout)
        )
        return LeasePage([lease_value(lease) for lease in response.leases], response.next_page_token)

    async def count_leases(self) -> int:
        count, token = 0, ""
        while True:
            page = await self.list_leases("", 1000, token)
            count += len(page.leases)
            token = page.next_page_token
            if not token:
                return count

    async def update_info(self, image_id: str, info: dict[str, Any]) -> None:
        request = ds.UpdateImageInfoRequest(name=IMAGE.format(image_id), info=dict_to_struct(info))
        stub = self.client.stub
        await self.client.call(
            f"updating the info of image {image_id!r}", lambda: stub.UpdateImageInfo(request, timeout=self._timeout)
        )

    async def set_score(self, image_id: str, key: str, value: float, model_version: str) -> None:
        request = ds.SetImageScoreRequest(
            name=IMAGE.format(image_id), score_key=key, value=value, model_version=model_version
        )
        stub = self.client.stub
        await self.client.call(
            f"storing the {key!r} score of image {image_id!r}",
            lambda: stub.SetImageScore(request, timeout=self._timeout),
        )

    async def images(self, labeled: bool, label_tag: str) -> list[ImageEntry]:
        images = await self.client.list_images(
            filter=ds.IMAGE_FILTER_LABELED if labeled else ds.IMAGE_FILTER_UNLABELED, label_tag=label_tag
        )
        return [image_entry(image) for image in images]

    async def download_image(self, image_id: str, dest_dir: Path) -> Path:
        return await self.client.download_image(image_id, dest_dir)

    async def download_label(self, image_id: str, tag: str, dest_dir: Path) -> Path:
        return await self.client.download_label(image_id, tag, dest_dir)

    async def serving_version(self, model: str) -> str | None:
        return await self.client.serving_version(model)
