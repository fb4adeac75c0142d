"""Resource names and required fields as the contracts declare them (AIP-122, AIP-203).

The patterns come from the `google.api.resource` options of the generated descriptors (and
`google.api.resource_definition` of a file, for a parent without a message of its own), so a
name parses exactly as protos/ says; no service spells a pattern by hand. Required fields are
those marked `(google.api.field_behavior) = REQUIRED`.

    IMAGE = resource_type("labelgrid.datastore/Image")      # pattern "images/{image}"
    IMAGE.parse("images/img_01")                            # -> ("img_01",)
    IMAGE.format("img_01")                                  # -> "images/img_01"
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

from google.api import field_behavior_pb2, resource_pb2
from google.protobuf import descriptor
from google.protobuf.message import Message
from labelgrid.activelearning.v1 import activelearning_service_pb2
from labelgrid.datastore.v1 import datastore_service_pb2
from labelgrid.inference.v1 import inference_service_pb2
from labelgrid.training.v1 import training_service_pb2

from services.common.errors import InvalidArgument

# The service files import every other labelgrid file, so their dependencies cover them all.
_ROOTS = (
    activelearning_service_pb2.DESCRIPTOR,
    datastore_service_pb2.DESCRIPTOR,
    inference_service_pb2.DESCRIPTOR,
    training_service_pb2.DESCRIPTOR,
)


@dataclass(frozen=True)
class ResourceType:
    """One resource type, e.g. "labelgrid.datastore/Label" with "images/{image}/labels/{tag}"."""

    type: str
    pattern: str

    @property
    def variables(self) -> tuple[str, ...]:
        """The pattern's variables in order, e.g. ("image", "tag")."""
        return tuple(s[1:-1] for s in self.pattern.split("/") if s.startswith("{"))

    def matches(self, name: str) -> bool:
        """Whether `name` has the pattern's literal segments and a non-empty value per variable."""
        want = self.pattern.split("/")
        got = name.split("/") if name else []
        return len(got) == len(want) and all(g if w.startswith("{") else g == w for w, g in zip(want, got, strict=True))

    def parse(self, name: str) -> tuple[str, ...]:
        """The variables' values of `name`, in pattern order; INVALID_INPUT if it does not match."""
        if not self.matches(name):
            raise InvalidArgument(f"resource name {name!r} must look like {self.pattern!r}")
        return tuple(g for w, g in zip(self.pattern.split("/"), name.split("/"), strict=True) if w.startswith("{"))

    def format(self, *values: str) -> str:
        """The name of the given variables' values, in pattern order."""
        if len(values) != len(self.variables):
            raise ValueError(f"{self.type} takes {len(self.variables)} values, got {len(values)}")
        parts = iter(values)
        return "/".join(next(parts) if s.startswith("{") else s for s in self.pattern.split("/"))


def _files() -> list[descriptor.FileDescriptor]:
    seen: dict[str, descriptor.FileDescriptor] = {}
    todo = list(_ROOTS)
    while todo:
        file = todo.pop()
        if file.name not in seen and file.package.startswith("labelgrid."):
            seen[file.name] = file
            todo.extend(file.dependencies)
    return [seen[name] for name in sorted(seen)]


def _messages(messages: Iterable[descriptor.Descriptor]) -> Iterable[descriptor.Descriptor]:
    for message in messages:
        yield message
        yield from _messages(message.nested_types)


def _declare(found: dict[str, ResourceType], spec: resource_pb2.ResourceDescriptor, where: str) -> None:
    if len(spec.pattern) != 1:
        raise RuntimeError(f"{where}: resource {spec.type!r} must declare exactly one pattern")
    if spec.type in found and found[spec.type].pattern != spec.pattern[0]:
        raise RuntimeError(f"{where}: resource {spec.type!r} is declared twice with different patterns")
    found[spec.type] = ResourceType(spec.type, spec.pattern[0])


@cache
def declared_types() -> dict[str, ResourceType]:
    """Every resource type the labelgrid contracts declare, by type."""
    found: dict[str, ResourceType] = {}
    for file in _files():
        for spec in file.GetOptions().Extensions[resource_pb2.resource_definition]:
            _declare(found, spec, file.name)
        for message in _messages(file.message_types_by_name.values()):
            options = message.GetOptions()
            if options.HasExtension(resource_pb2.resource):
                _declare(found, options.Extensions[resource_pb2.resource], message.full_name)
    return found


def resource_type(type_: str) -> ResourceType:
    """The declared resource type `type_` (e.g. "labelgrid.training/TrainingJob")."""
    try:
        return declared_types()[type_]
    except KeyError:
        raise LookupError(f"no labelgrid contract declares the resource type {type_!r}") from None


@cache
def required_fields(message: descriptor.Descriptor) -> tuple[descriptor.FieldDescriptor, ...]:
    """The fields of a message marked `(google.api.field_behavior) = REQUIRED`."""
    return tuple(
        field
        for field in message.fields
        if field_behavior_pb2.REQUIRED in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    )


def _is_set(message: Message, field: descriptor.FieldDescriptor) -> bool:
    if field.is_repeated:
        return len(getattr(message, field.name)) > 0
    if field.message_type is not None or field.has_presence:
        return message.HasField(field.name)
    return bool(getattr(message, field.name))


def check_required(message: Message) -> None:
    """INVALID_INPUT naming the first REQUIRED field of `message` that is unset or empty."""
    for field in required_fields(message.DESCRIPTOR):
        if not _is_set(message, field):
            raise InvalidArgument(f"{field.name} is required ({message.DESCRIPTOR.name})")
