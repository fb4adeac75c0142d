"""services.common.resource_names: names parsed by the contracts' `google.api.resource` patterns,
REQUIRED fields checked from `google.api.field_behavior`, on the real generated descriptors (and,
for the check, a real grpc.aio server with the services' interceptors)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import google.api
import grpc
import pytest
from google.api import field_behavior_pb2, resource_pb2
from labelgrid.datastore.v1 import datastore_service_pb2 as ds_pb
from labelgrid.training.v1 import resources_pb2 as training_res
from labelgrid.training.v1 import training_service_pb2 as training_pb

from services.common import resource_names
from services.common.errors import InvalidArgument
from services.common.grpc_errors import error_details
from services.common.resource_names import ResourceType, check_required, declared_types, resource_type
from services.common.server import GrpcService
from services.common.settings import ServiceSettings
from services.common.streams import receive_upload
from services.datastore.api.convert import blob_name_of

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]


def _fields() -> Iterator[tuple[str, object]]:
    for file in resource_names._files():
        for message in resource_names._messages(file.message_types_by_name.values()):
            for field in message.fields:
                yield message.full_name, field


def test_every_labelgrid_resource_is_declared_once_with_one_pattern() -> None:
    types = declared_types()
    assert types["labelgrid.training/TrainingJob"].pattern == "trainingJobs/{job}"
    assert types["labelgrid.activelearning/ScoringJob"].pattern == "scoringJobs/{job}"
    for type_, declared in types.items():
        service, _, kind = type_.partition("/")
        assert service.startswith("labelgrid.") and kind[:1].isupper(), type_
        assert declared.variables and all(declared.variables), declared


def test_the_declared_patterns_are_the_names_the_services_use() -> None:
    assert {type_: declared.pattern for type_, declared in declared_types().items()} == {
        "labelgrid.activelearning/Lease": "leases/{image}",
        "labelgrid.activelearning/ScoringJob": "scoringJobs/{job}",
        "labelgrid.activelearning/ScoringMethod": "scoringMethods/{method}",
        "labelgrid.activelearning/Strategy": "strategies/{strategy}",
        "labelgrid.datastore/Image": "images/{image}",
        "labelgrid.datastore/Label": "images/{image}/labels/{tag}",
        "labelgrid.datastore/Lease": "leases/{image}",
        "labelgrid.datastore/Model": "models/{model}",
        "labelgrid.datastore/ModelVersion": "models/{model}/versions/{version}",
        "labelgrid.datastore/Record": "records/{kind}/{record}",
        "labelgrid.datastore/RecordKind": "records/{kind}",
        "labelgrid.datastore/Session": "sessions/{session}",
        "labelgrid.inference/BatchInferenceJob": "batchInferenceJobs/{job}",
        "labelgrid.inference/Model": "models/{model}",
        "labelgrid.training/Trainer": "trainers/{trainer}",
        "labelgrid.training/TrainingJob": "trainingJobs/{job}",
    }


def test_download_url_names_are_an_image_a_label_or_a_model_version() -> None:
    assert blob_name_of("images/a") == ("image", ("a",))
    assert blob_name_of("images/a/labels/final") == ("label", ("a", "final"))
    assert blob_name_of("models/m/versions/v000001") == ("model_version", ("m", "v000001"))
    for name in ("", "images/a/scores/x", "models/m", "records/k/r", "images//labels/final"):
        with pytest.raises(InvalidArgument, match="must name an image"):
            blob_name_of(name)


def test_every_resource_reference_names_a_declared_type() -> None:
    """A reference to a type no contract declares is a typo (or a resource not annotated yet)."""
    types = declared_types()
    wrong = []
    for owner, field in _fields():
        reference = field.GetOptions().Extensions[resource_pb2.resource_reference]  # type: ignore[attr-defined]
        for type_ in filter(None, (reference.type, reference.child_type)):
            if type_ not in types and type_ != "*":  # "*": any of several types
                wrong.append(f"{owner}.{field.name}: {type_}")  # type: ignore[attr-defined]
    assert not wrong


def test_parse_and_format_round_trip() -> None:
    job = resource_type("labelgrid.training/TrainingJob")
    assert job.parse("trainingJobs/6f1c") == ("6f1c",)
    assert job.format("6f1c") == "trainingJobs/6f1c"
    assert job.variables == ("job",)
    two = ResourceType("example/Label", "images/{image}/labels/{tag}")
    assert two.parse("images/img_01/labels/final") == ("img_01", "final")
    assert two.format("img_01", "final") == "images/img_01/labels/final"
    with pytest.raises(ValueError):
        two.format("img_01")


@pytest.mark.parametrize(
    "name",
    ["", "trainingJobs", "trainingJobs/", "trainingJobs/a/b", "trainers/a", "/trainingJobs/a", "TrainingJobs/a"],
)
def test_a_name_off_the_pattern_is_invalid_input(name: str) -> None:
    job = resource_type("labelgrid.training/TrainingJob")
    assert not job.matches(name)
    with pytest.raises(InvalidArgument) as caught:
        job.parse(name)
    assert caught.value.reason == "INVALID_INPUT"
    assert "trainingJobs/{job}" in caught.value.message


def test_an_undeclared_type_is_a_lookup_error() -> None:
    with pytest.raises(LookupError):
        resource_type("labelgrid.training/Nothing")


def test_required_fields_come_from_field_behavior() -> None:
    names = [f.name for f in resource_names.required_fields(training_pb.GetTrainingJobRequest.DESCRIPTOR)]
    assert names == ["name"]
    assert resource_names.required_fields(training_pb.ListTrainingJobsRequest.DESCRIPTOR) == ()
    for owner, field in _fields():
        behaviors = set(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])  # type: ignore[attr-defined]
        # A field is never both required and output only / optional.
        assert not (field_behavior_pb2.REQUIRED in behaviors and behaviors - {field_behavior_pb2.REQUIRED}), owner


def test_check_required() -> None:
    check_required(training_pb.GetTrainingJobRequest(name="trainingJobs/x"))
    check_required(training_pb.ListTrainingJobsRequest())
    with pytest.raises(InvalidArgument, match="name is required"):
        check_required(training_pb.GetTrainingJobRequest())
    with pytest.raises(InvalidArgument, match="training_job is required"):
        check_required(training_pb.CreateTrainingJobRequest(enqueue=True))
    # A set message counts as given even when empty; its own fields are the handler's business.
    check_required(training_pb.CreateTrainingJobRequest(training_job=training_res.TrainingJob()))


def test_vendored_annotations_equal_the_installed_package() -> None:
    """protos/third_party is a copy of googleapis-common-protos' files, whose Python code the services use."""
    installed = Path(next(iter(google.api.__path__)))
    for name in ("resource.proto", "field_behavior.proto"):
        assert (REPO / "protos/third_party/google/api" / name).read_bytes() == (installed / name).read_bytes()


async def test_the_servicers_refuse_a_request_missing_a_required_field() -> None:
    """The services' interceptors refuse it, INVALID_ARGUMENT (INVALID_INPUT), before the handler runs."""
    reached: list[str] = []

    async def get(request: training_pb.GetTrainingJobRequest, context: object) -> training_res.TrainingJob:
        reached.append(request.name)
        return training_res.TrainingJob(name=request.name)

    method = "GetTrainingJob"
    handler = grpc.method_handlers_generic_handler(
        "test.Required",
        {
            method: grpc.unary_unary_rpc_method_handler(
                get,
                request_deserializer=training_pb.GetTrainingJobRequest.FromString,
                response_serializer=training_res.TrainingJob.SerializeToString,
            )
        },
    )
    service = GrpcService(
        ServiceSettings(port=0, metrics_port=0, grace_seconds=1.0),
        ["test.Required"],
        lambda server: server.add_generic_rpc_handlers((handler,)),
    )
    await service.start()
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            call = channel.unary_unary(
                f"/test.Required/{method}",
                request_serializer=training_pb.GetTrainingJobRequest.SerializeToString,
                response_deserializer=training_res.TrainingJob.FromString,
            )
            assert (await call(training_pb.GetTrainingJobRequest(name="trainingJobs/a"), timeout=5)).name
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(training_pb.GetTrainingJobRequest(), timeout=5)
    finally:
        await service.stop(0)
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_INPUT"
    assert "name is required" in details.message
    assert reached == ["trainingJobs/a"]


async def test_an_upload_header_missing_a_required_field_is_refused_before_spooling() -> None:
    opened: list[object] = []

    async def requests() -> AsyncIterator[ds_pb.UploadLabelRequest]:
        yield ds_pb.UploadLabelRequest(header=ds_pb.UploadLabelHeader(tag="final", file_name="a.nii.gz"))
        yield ds_pb.UploadLabelRequest(chunk=b"never read")

    def open_spool(header: object) -> Any:
        opened.append(header)
        raise AssertionError("spooled an upload whose header lacks a required field")

    with pytest.raises(InvalidArgument, match="image is required"):
        await receive_upload(requests(), open_spool)
    assert opened == []
