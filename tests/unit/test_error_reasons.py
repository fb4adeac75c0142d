"""The `ErrorReason` enum (protos/labelgrid/common/v1/common.proto) is the one list of error
reasons: every reason the code can raise is one of its names without `ERROR_REASON_`.

The reasons are found by reading the source with `ast`, so a new `reason="..."` anywhere in
services/, gateway/, apps/ or the SDK is checked without being listed here: keyword args
`reason=...` (every string constant the expression can be, so `details.reason or "X"` counts),
`reason = "..."` class attributes (the error classes' defaults), `{"reason": "..."}` job
errors, and the reason argument of `rich_status(code, message, reason)`.
"""

from __future__ import annotations

import ast
from pathlib import Path

from labelgrid.common.v1 import common_pb2

from services.common import errors

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("services", "gateway", "apps", "sdk")
ENUM_REASONS = {name.removeprefix("ERROR_REASON_") for name in common_pb2.ErrorReason.keys()} - {"UNSPECIFIED"}  # noqa: SIM118 - an EnumTypeWrapper is not iterable


def _strings(node: ast.AST) -> list[ast.Constant]:
    """The string constants an expression can evaluate to: "X", `a or "X"`, `"X" if c else "Y"`."""
    if isinstance(node, ast.Constant):
        return [node] if isinstance(node.value, str) else []
    if isinstance(node, ast.BoolOp):
        return [const for value in node.values for const in _strings(value)]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    return []


def raised_reasons(tree: ast.AST) -> list[ast.Constant]:
    """The string constants used as an error reason in one module."""
    found: list[ast.Constant] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "reason":
            found += _strings(node.value)
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                target = stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None
                if isinstance(stmt, ast.AnnAssign):
                    target = stmt.target
                value = getattr(stmt, "value", None)
                if isinstance(target, ast.Name) and target.id == "reason" and value is not None:
                    found += _strings(value)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "reason":
                    found += _strings(value)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name == "rich_status" and len(node.args) >= 3:
                found += _strings(node.args[2])
    return found


def source_reasons() -> dict[str, str]:
    """Each reason the code raises -> the first place that raises it (path:line)."""
    where: dict[str, str] = {}
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            for const in raised_reasons(ast.parse(path.read_text(), filename=str(path))):
                where.setdefault(const.value, f"{path.relative_to(ROOT)}:{const.lineno}")
    return where


def test_every_reason_the_code_raises_is_in_the_enum() -> None:
    where = source_reasons()
    # The scan finds the reasons the code is known to raise (a scan that finds nothing proves nothing).
    assert {"INVALID_INPUT", "IMAGE_NOT_FOUND", "NOT_FOUND", "ALREADY_RUNNING", "PACS_UNAVAILABLE"} <= set(where)
    missing = {reason: place for reason, place in where.items() if reason not in ENUM_REASONS}
    assert not missing, f"reasons raised but not in ErrorReason (common.proto): {missing}"


def test_error_class_defaults_are_in_the_enum() -> None:
    classes = [errors.LabelgridError, *_subclasses(errors.LabelgridError)]
    assert len(classes) > 10
    assert {cls.__name__: cls.reason for cls in classes if cls.reason not in ENUM_REASONS} == {}


def test_the_scan_sees_each_form_of_reason() -> None:
    tree = ast.parse(
        "class E(Err):\n    reason = 'A1'\n"
        "raise E('x', reason='A2')\n"
        "LabelgridError(m, reason=details.reason or 'A3')\n"
        "doc = {'error': {'reason': 'A4', 'message': 'm'}}\n"
        "rich_status(code, 'message', 'A5')\n"
        "JobError(reason=str(error.get('reason', '')))\n"
        "Info(reason='A6' if ok else 'A7')\n"
        "other(reason_text='B1')\n"
    )
    assert sorted(c.value for c in raised_reasons(tree)) == ["A1", "A2", "A3", "A4", "A5", "A6", "A7"]


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out
