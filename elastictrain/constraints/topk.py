"""Selection: which entries of each row survive. Pure, deterministic functions of tensors.

Ties are broken by index (the lower index wins), never by the sort order of a particular kernel,
so every rank that holds the same scores selects the same entries — the property the distributed
layer relies on. ``topk_mask`` costs O(n) (``kthvalue`` + a cumulative sum), not a full sort;
``unit_topk_mask`` (per layer or per workload) and ``pooled_topk_masks`` (one threshold over
several layers) are the prune steps' selections built on it.

Legend: U = a unit-score tensor (4-D, the unit grid's part counts as shape).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from elastictrain.constraints.grid import block_unview, block_view

NARROW = 32  # rows at most this wide are selected by a stable sort (measured faster on CPU)


def topk_mask(scores_GB: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask keeping the ``k`` largest scores of every row (ties: lower index first).

    ``scores_GB`` is (G, B); every row keeps exactly ``min(k, B)`` entries — this is what makes a
    balanced selection balanced.
    """
    G, B = scores_GB.shape
    if k >= B:
        return torch.ones_like(scores_GB, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores_GB, dtype=torch.bool)
    if B <= NARROW:  # narrow rows (kernels' positions): a stable sort beats kthvalue + cumsum
        idx = torch.sort(scores_GB, dim=1, descending=True, stable=True).indices[:, :k]
        return torch.zeros_like(scores_GB, dtype=torch.bool).scatter_(1, idx, True)
    # k-th largest = (B - k + 1)-th smallest
    thr_G1 = torch.kthvalue(scores_GB, B - k + 1, dim=1, keepdim=True).values
    above = scores_GB > thr_G1
    tied = scores_GB == thr_G1
    need_G1 = k - above.sum(1, keepdim=True)
    # the first `need` tied entries of each row (in index order) complete the row to exactly k
    return above | (tied & (tied.cumsum(1) <= need_G1))


def keep_count(units: int, ratio: float | None = None, density: float | None = None, floor: int = 1) -> int:
    """Units kept out of ``units`` for a ratio (before / kept) or a density, rounded **down**: a
    ratio is a promise never to keep more than it allows (the 1e-9 absorbs float error, so 1000
    units at 50× keep 20, not 19).

    ``floor`` is the least number kept (1 for a layer or a workload, so neither is wiped out by
    rounding; the achieved ratio is then lower than asked, which ``plan.resolve`` says).
    """
    d = density if density is not None else 1.0 / float(ratio if ratio is not None else 1.0)
    return min(units, max(floor, math.floor(units * d * (1 + 1e-9))))


def unit_topk_mask(scores_U: torch.Tensor, k: int, workload: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """Keep the ``k`` best units of ``scores_U``: in every workload of the grid ``workload`` over
    it (balanced: equal counts), or, with no workload, in the whole tensor. Bool, ``scores_U``'s shape."""
    if workload is not None:
        rows = block_view(scores_U, workload)
        return block_unview(topk_mask(rows, k), scores_U.shape, workload)
    return topk_mask(scores_U.reshape(1, -1), k).reshape(scores_U.shape)


def pooled_topk_masks(scores: list[torch.Tensor], density: float) -> list[torch.Tensor]:
    """One threshold over every tensor of ``scores`` (a global pool): ``keep_count(total, density)``
    kept in all, ties to the earlier tensor, then the lower index. A mask per tensor, its shape."""
    flat = torch.cat([sc.reshape(-1) for sc in scores])
    keep = topk_mask(flat[None], keep_count(flat.numel(), density=density))[0]
    return [part.reshape(sc.shape) for sc, part in zip(scores, keep.split([sc.numel() for sc in scores]))]
