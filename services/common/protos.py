"""Helpers every proto adapter needs: resource names and Struct <-> dict."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

from services.common.errors import InvalidArgument


def split_resource_name(name: str, pattern: str) -> list[str]:
    """The variables of `name` by a pattern like "images/{image}/labels/{tag}"; INVALID_INPUT otherwise."""
    want = pattern.split("/")
    got = name.split("/") if name else []
    if len(got) != len(want) or any(w != g for w, g in zip(want, got) if not w.startswith("{")):
        raise InvalidArgument(f"resource name {name!r} must look like {pattern!r}")
    values = [g for w, g in zip(want, got) if w.startswith("{")]
    if any(not v for v in values):
        raise InvalidArgument(f"resource name {name!r} must look like {pattern!r}")
    return values


def _integral(value: Any) -> Any:
    """Struct holds every number as a double; give JSON integers (MONAI Label's ts, idx) back as int."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def struct_to_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    return _integral(json_format.MessageToDict(message))


def dict_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out
