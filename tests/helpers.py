"""Hand-written references and hypothesis strategies shared by the constraint-layer tests."""
from __future__ import annotations

import itertools

import torch
from hypothesis import strategies as st

from elastictrain.constraints.grid import AXES, Grid


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def loop_block_view(x: torch.Tensor, parts) -> torch.Tensor:
    """Reference for grid.block_view: nested Python loops over blocks, row-major inside a block."""
    d = x.shape
    b = [d[i] // parts[i] for i in range(4)]
    rows = []
    for i0, i1, i2, i3 in itertools.product(*(range(p) for p in parts)):
        blk = x[i0 * b[0]:(i0 + 1) * b[0], i1 * b[1]:(i1 + 1) * b[1],
                i2 * b[2]:(i2 + 1) * b[2], i3 * b[3]:(i3 + 1) * b[3]]
        rows.append(blk.reshape(-1))
    return torch.stack(rows)


@st.composite
def shapes(draw, conv_only: bool = False):
    F = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    C = draw(st.sampled_from([1, 2, 4, 6, 8]))
    if conv_only or draw(st.booleans()):
        k = draw(st.sampled_from([1, 2, 3]))
        return (F, C, k, k)
    return (F, C)


def shape4(shape) -> tuple[int, int, int, int]:
    return tuple(shape) + (1,) * (4 - len(shape))


@st.composite
def grids(draw, shape):
    """Any grid valid for ``shape`` (as a plain dict, as a user writes it)."""
    out = {}
    for axis, size in zip(AXES, shape4(shape)):
        out[axis] = draw(st.sampled_from(["each", "any"] + divisors(size)))
    return out


@st.composite
def coarser_grids(draw, shape, unit: dict):
    """A workload grid whose blocks are unions of ``unit`` blocks."""
    parts = Grid(**unit).parts(shape4(shape))
    return {axis: draw(st.sampled_from(divisors(p))) for axis, p in zip(AXES, parts)}


@st.composite
def weights(draw, shape, ties: bool = False):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if ties:  # many equal magnitudes, none zero: exercises the index tie-break
        w = torch.sign(w) * (1 + torch.round(w.abs() * 2)) / 2
        w[w == 0] = 0.5
    return w


def largest_kept(scores: torch.Tensor, keep: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Every kept score ≥ every dropped score (up to float rounding of the reference)."""
    if keep.all() or not keep.any():
        return True
    lo = scores[keep].min()
    hi = scores[~keep].max()
    return bool(lo >= hi - rtol * abs(float(hi)))
