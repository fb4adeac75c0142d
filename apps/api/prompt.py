"""The prompt of an interactive model: plain data, importable without torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

Point = tuple[int, int, int]
"""A voxel index (i, j, k) into the input image."""


@dataclass(frozen=True)
class Prompt:
    """What a user gave an interactive model, in voxel indices of the input image."""

    label: str = ""
    foreground: tuple[Point, ...] = ()
    background: tuple[Point, ...] = ()
    label_points: Mapping[str, tuple[Point, ...]] = field(default_factory=dict)

    def all_points(self) -> list[Point]:
        points = [*self.foreground, *self.background]
        for group in self.label_points.values():
            points.extend(group)
        return points
