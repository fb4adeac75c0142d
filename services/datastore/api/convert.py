"""Conversions between the datastore's protos and its domain types: the only code that knows both."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2
from labelgrid.common.v1 import common_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as pb
from labelgrid.datastore.v1 import resources_pb2 as res

from services.common.errors import InvalidArgument
from services.common.protos import dict_to_struct
from services.common.resource_names import resource_type
from services.datastore.domain.datastore import BlobRead, DatastoreInfo, DownloadUrl
from services.datastore.domain.model import (
    DatastoreStatus,
    ImageFilter,
    ImageOrder,
    ImageRecord,
    LabelRecord,
    LeaseRecord,
    ModelRecord,
    ModelVersionRecord,
    Record,
    SessionRecord,
)

# -- resource names ------------------------------------------------------------------------


IMAGE = resource_type("labelgrid.datastore/Image")
LABEL = resource_type("labelgrid.datastore/Label")
MODEL = resource_type("labelgrid.datastore/Model")
MODEL_VERSION = resource_type("labelgrid.datastore/ModelVersion")
LEASE = resource_type("labelgrid.datastore/Lease")
RECORD = resource_type("labelgrid.datastore/Record")
RECORD_KIND = resource_type("labelgrid.datastore/RecordKind")
SESSION = resource_type("labelgrid.datastore/Session")


def image_id_of(name: str) -> str:
    return IMAGE.parse(name)[0]


def label_of(name: str) -> tuple[str, str]:
    image_id, tag = LABEL.parse(name)
    return image_id, tag


def model_of(name: str) -> str:
    return MODEL.parse(name)[0]


def model_version_of(name: str) -> tuple[str, str]:
    model, version = MODEL_VERSION.parse(name)
    return model, version


def record_of(name: str) -> tuple[str, str]:
    kind, record_id = RECORD.parse(name)
    return kind, record_id


def record_kind_of(parent: str) -> str:
    return RECORD_KIND.parse(parent)[0]


def session_of(name: str) -> str:
    return SESSION.parse(name)[0]


def lease_image_of(name: str) -> str:
    return LEASE.parse(name)[0]


_BLOBS = {"image": IMAGE, "label": LABEL, "model_version": MODEL_VERSION}


def blob_name_of(name: str) -> tuple[str, tuple[str, ...]]:
    """Names GetDownloadUrl accepts: an image, a label or a model version."""
    for kind, type_ in _BLOBS.items():
        if type_.matches(name):
            return kind, type_.parse(name)
    raise InvalidArgument(
        f"resource name {name!r} must name an image ({IMAGE.pattern}), a label "
        f"({LABEL.pattern}) or a model version ({MODEL_VERSION.pattern})"
    )


# -- values --------------------------------------------------------------------------------


def timestamp(value: datetime | float | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    out = timestamp_pb2.Timestamp()
    if isinstance(value, datetime):
        out.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    else:
        out.FromNanoseconds(int(value * 1e9))
    return out


IMAGE_FILTERS = {
    pb.IMAGE_FILTER_UNSPECIFIED: ImageFilter.ALL,
    pb.IMAGE_FILTER_LABELED: ImageFilter.LABELED,
    pb.IMAGE_FILTER_UNLABELED: ImageFilter.UNLABELED,
}
IMAGE_ORDERS = {
    pb.IMAGE_ORDER_UNSPECIFIED: ImageOrder.ID,
    pb.IMAGE_ORDER_SCORE_DESC: ImageOrder.SCORE_DESC,
    pb.IMAGE_ORDER_RANDOM: ImageOrder.RANDOM,
}
NO_IMAGE_REASONS = {
    "EMPTY": pb.NO_IMAGE_REASON_EMPTY,
    "ALL_LABELED": pb.NO_IMAGE_REASON_ALL_LABELED,
    "ALL_LEASED": pb.NO_IMAGE_REASON_ALL_LEASED,
}


def image_filter(value: int) -> ImageFilter:
    try:
        return IMAGE_FILTERS[value]
    except KeyError:
        raise InvalidArgument(f"unknown image filter {value}") from None


def image_order(value: int) -> ImageOrder:
    try:
        return IMAGE_ORDERS[value]
    except KeyError:
        raise InvalidArgument(f"unknown image order {value}") from None


def expected_revision(value: int) -> int | None:
    return value or None


# -- resources -----------------------------------------------------------------------------


def label(record: LabelRecord) -> res.Label:
    return res.Label(
        name=LABEL.format(record.image_id, record.tag),
        image_id=record.image_id,
        tag=record.tag,
        file_name=record.file_name,
        ext=record.ext,
        size_bytes=record.size,
        sha256=record.sha256,
        info=dict_to_struct(record.info),
        revision=record.revision,
        create_time=timestamp(record.create_time),
        update_time=timestamp(record.update_time),
    )


def image(record: ImageRecord) -> res.Image:
    return res.Image(
        name=IMAGE.format(record.image_id),
        image_id=record.image_id,
        file_name=record.file_name,
        ext=record.ext,
        size_bytes=record.size,
        sha256=record.sha256,
        info=dict_to_struct(record.info),
        revision=record.revision,
        create_time=timestamp(record.create_time),
        update_time=timestamp(record.update_time),
        labels=[label(item) for _, item in sorted(record.labels.items())],
        scores=record.scores,
    )


def model(record: ModelRecord) -> res.Model:
    return res.Model(
        name=MODEL.format(record.model),
        model_id=record.model,
        latest_version=record.latest_version or "",
        pinned_version=record.pinned_version or "",
        serving_version=record.serving_version or "",
    )


def model_version(record: ModelVersionRecord) -> res.ModelVersion:
    return res.ModelVersion(
        name=MODEL_VERSION.format(record.model, record.version),
        model_id=record.model,
        version=record.version,
        file_name=record.file_name,
        size_bytes=record.size,
        sha256=record.sha256,
        metrics=dict_to_struct(record.metrics),
        info=dict_to_struct(record.info),
        create_time=timestamp(record.create_time),
    )


def lease(record: LeaseRecord) -> res.Lease:
    return res.Lease(
        name=LEASE.format(record.image_id),
        image_id=record.image_id,
        client_id=record.client_id,
        strategy=record.strategy,
        acquire_time=timestamp(record.acquire_time),
        expire_time=timestamp(record.expire_time),
    )


def record(value: Record) -> res.Record:
    return res.Record(
        name=RECORD.format(value.kind, value.record_id),
        kind=value.kind,
        record_id=value.record_id,
        data=dict_to_struct(value.data),
        revision=value.revision,
        create_time=timestamp(value.create_time),
        update_time=timestamp(value.update_time),
    )


def session(value: SessionRecord) -> res.Session:
    return res.Session(
        name=SESSION.format(value.session_id),
        session_id=value.session_id,
        owner=value.owner,
        file_name=value.file_name,
        meta=dict_to_struct(value.meta),
        create_time=timestamp(value.create_time),
        last_access_time=timestamp(value.last_access_time),
        expire_time=timestamp(value.expire_time),
        expiry_seconds=value.expiry_seconds,
        size_bytes=value.size,
        sha256=value.sha256,
    )


def status(value: DatastoreStatus) -> pb.GetStatusResponse:
    return pb.GetStatusResponse(total=value.total, completed=value.completed, label_tags=value.label_tags)


def datastore_info(value: DatastoreInfo) -> pb.GetDatastoreInfoResponse:
    return pb.GetDatastoreInfoResponse(
        display_name=value.display_name,
        description=value.description,
        backend=value.backend,
        location=value.location,
        status=status(value.status),
    )


def blob_info(read: BlobRead) -> common_pb2.BlobInfo:
    return common_pb2.BlobInfo(
        file_name=read.file_name,
        size_bytes=read.size,
        sha256=read.sha256,
        content_type=read.content_type,
        read_offset=read.offset,
        read_size_bytes=read.length,
    )


def download_url(value: DownloadUrl) -> pb.GetDownloadUrlResponse:
    return pb.GetDownloadUrlResponse(
        url=value.url,
        expire_time=timestamp(value.expire_time),
        info=common_pb2.BlobInfo(
            file_name=value.file_name,
            size_bytes=value.size,
            sha256=value.sha256,
            content_type="application/octet-stream",
            read_size_bytes=value.size,
        ),
    )
