"""Grouping: how a weight tensor is cut into units, workloads and codebook groups.

Every constrained weight is viewed with four axes, (filter, channel, row, column) — a linear
weight is (filter, channel, 1, 1). A *grid* partitions each axis as ``each`` (every index its own
part), ``any`` (the whole axis one part) or an integer number of equal contiguous parts. Resolved
against a shape, a grid becomes four integer part counts, and ``block_view`` turns the tensor into
a ``(G, B)`` matrix: one row per block, its elements in row-major order inside the block. Every
selection in this package works on such rows, so a new structure is a new grid, not a new path.

Legend: F, C, R, S = filter, channel, row, column sizes; G = number of blocks; B = block size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from elastictrain.config import fail

AXES = ("filter", "channel", "row", "column")
Part = Union[str, int]  # "each" | "any" | number of equal parts


def _check_part(axis: str, part: Part) -> None:
    if isinstance(part, bool) or not (part in ("each", "any") or (isinstance(part, int) and part >= 1)):
        fail(axis, f"must be 'each', 'any' or a positive integer (got {part!r})")


@dataclass(frozen=True, slots=True)
class Grid:
    """A partition of the four weight axes; an axis left out is ``any`` (not split)."""

    filter: Part = "any"
    channel: Part = "any"
    row: Part = "any"
    column: Part = "any"

    def __post_init__(self) -> None:
        for axis in AXES:
            _check_part(axis, getattr(self, axis))

    @classmethod
    def named(cls, unit: str) -> "Grid":
        """The seed's named units as grids."""
        if unit not in NAMED_UNITS:
            raise ValueError(f"unknown unit {unit!r} (expected one of {sorted(NAMED_UNITS)} or a grid)")
        return NAMED_UNITS[unit]

    def parts(self, shape4: tuple[int, ...], where: str = "") -> tuple[int, int, int, int]:
        """Integer part counts per axis for a 4-D shape; raises naming the axis that does not divide
        (or that is empty: a 0-element weight is refused when a plan is made, not projected)."""
        out = []
        for axis, size in zip(AXES, shape4):
            part = getattr(self, axis)
            if size == 0:  # "each" would give 0 parts (a division by zero below) and no unit exists to keep
                fail(axis, f"the {axis} axis of {where or 'the tensor'} has size 0: an empty weight cannot be "
                     "constrained (exempt it with a rule that has no constraints)")
            n = size if part == "each" else 1 if part == "any" else part
            if size % n:
                fail(axis, f"{n} parts do not divide the {axis} axis of {where or 'the tensor'} (size {size})")
            out.append(n)
        return tuple(out)  # type: ignore[return-value]

    def describe(self) -> str:
        return ", ".join(f"{a}: {getattr(self, a)}" for a in AXES)


NAMED_UNITS = {
    "element": Grid("each", "each", "each", "each"),
    "kernel": Grid("each", "each", "any", "any"),
    "filter": Grid("each", "any", "any", "any"),
    "channel": Grid("any", "each", "any", "any"),
}


def as4d(w: torch.Tensor) -> torch.Tensor:
    """View a conv (F, C, R, S) or linear (F, C) weight as 4-D without copying."""
    if w.dim() == 4:
        return w
    if w.dim() == 2:
        return w.reshape(w.shape[0], w.shape[1], 1, 1)
    raise ValueError(f"expected a 2-D (linear) or 4-D (conv) weight, got shape {tuple(w.shape)}")


def block_view(x: torch.Tensor, parts: tuple[int, ...]) -> torch.Tensor:
    """(d0, d1, d2, d3) → (G, B): one row per block of the grid ``parts``."""
    d, p = x.shape, parts
    x8 = x.reshape(p[0], d[0] // p[0], p[1], d[1] // p[1], p[2], d[2] // p[2], p[3], d[3] // p[3])
    return x8.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(p[0] * p[1] * p[2] * p[3], -1)


def block_unview(x_GB: torch.Tensor, shape4: tuple[int, ...], parts: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`block_view`."""
    d, p = shape4, parts
    b = (d[0] // p[0], d[1] // p[1], d[2] // p[2], d[3] // p[3])
    x8 = x_GB.reshape(p[0], p[1], p[2], p[3], *b)
    return x8.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(d)


def coarser(outer: tuple[int, ...], inner: tuple[int, ...]) -> bool:
    """True when every block of grid ``outer`` is a union of blocks of grid ``inner``."""
    return all(i % o == 0 for o, i in zip(outer, inner))
