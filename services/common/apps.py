"""Loads an app package by dotted name (settings `app`, env LABELGRID_APP).

An app module exposes `infer_tasks() -> dict[str, InferTask]` and, optionally,
`trainers()`, `strategies()` and `scoring_methods()` (each a dict by name, MONAI Label's
`trainers`, `strategies` and `scoring` in /info), and may set NAME, DESCRIPTION, VERSION
and LABELS. Loaded by
import, never by file path, and returned as a value: no app singleton, so a test can load
two apps side by side.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from services.common.errors import FailedPrecondition, NotFound

DEFAULT_APP = "apps.radiology"
# Per part of an app: what users call one, and the NOT_FOUND reason for an unknown name.
_PARTS = {
    "infer_tasks": ("model", "MODEL_NOT_FOUND"),
    "trainers": ("trainer", "MODEL_NOT_FOUND"),
    "strategies": ("strategy", "STRATEGY_NOT_FOUND"),
    "scoring_methods": ("scoring method", "STRATEGY_NOT_FOUND"),
}


@dataclass
class LoadedApp:
    """What a service needs of an app: its identity and its tasks."""

    module_name: str
    name: str
    description: str
    version: str
    labels: dict[str, int]
    labels_as_list: bool
    infer_tasks: dict[str, Any] = field(default_factory=dict)
    trainers: dict[str, Any] = field(default_factory=dict)
    strategies: dict[str, Any] = field(default_factory=dict)
    scoring_methods: dict[str, Any] = field(default_factory=dict)
    # MONAI Bundles served next to the app's own models (services.common.bundles adds them), by model name.
    bundles: dict[str, Any] = field(default_factory=dict)

    def lookup(self, part: str, name: str) -> Any:
        """A model, trainer, strategy or scoring method by name (`part` is the attribute);
        NOT_FOUND with the right reason, naming what the app has, if there is none."""
        found = getattr(self, part).get(name)
        if found is None:
            what, reason = _PARTS[part]
            known = ", ".join(getattr(self, part)) or "none"
            raise NotFound(
                f"{what} {name!r} does not exist; this app has: {known}",
                reason=reason,
                metadata={what.replace(" ", "_"): name},
            )
        return found


def _labels(module: ModuleType, infer_tasks: dict[str, Any]) -> tuple[dict[str, int], bool]:
    """The app's own LABELS as declared, else the union of its models' labels (MONAI Label's /info)."""
    declared = getattr(module, "LABELS", None)
    if isinstance(declared, (list, tuple)):
        return {str(name): index + 1 for index, name in enumerate(declared)}, True
    if isinstance(declared, dict):
        return {str(k): int(v) for k, v in declared.items()}, False
    # As MONAI Label merges them: a list of names, model by model, each model's labels by index.
    # A list, never a dict: OHIF's MONAI Label panel pushes every model's labels onto it.
    merged: list[str] = []
    for task in infer_tasks.values():
        for name, _ in sorted(dict(getattr(task, "labels", {}) or {}).items(), key=lambda item: item[1]):
            if name not in merged:
                merged.append(str(name))
    return {name: position + 1 for position, name in enumerate(merged)}, True


def load_app(module_name: str = DEFAULT_APP) -> LoadedApp:
    """Imports the app and builds its tasks; FAILED_PRECONDITION (MODEL_IMPORT_ERROR) if it cannot."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise FailedPrecondition(f"cannot import app {module_name!r}: {error}", reason="MODEL_IMPORT_ERROR") from error
    factory = getattr(module, "infer_tasks", None)
    if not callable(factory):
        raise FailedPrecondition(f"app {module_name!r} has no infer_tasks() function", reason="MODEL_IMPORT_ERROR")
    tasks = {name: task for name, task in dict(factory()).items() if task.is_valid()}
    labels, as_list = _labels(module, tasks)
    optional = {
        part: dict(getattr(module, part)()) if callable(getattr(module, part, None)) else {}
        for part in ("trainers", "strategies", "scoring_methods")
    }
    return LoadedApp(
        module_name=module_name,
        name=str(getattr(module, "NAME", module_name.rsplit(".", 1)[-1])),
        description=str(
            getattr(module, "DESCRIPTION", (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else "")
        ),
        version=str(getattr(module, "VERSION", "0.0.0")),
        labels=labels,
        labels_as_list=as_list,
        infer_tasks=tasks,
        **optional,
    )
