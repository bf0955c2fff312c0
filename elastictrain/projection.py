"""The composed projection: weights → nearest weights that satisfy every constraint of their rule.

Order, per layer (each step narrows the previous one's mask, so all hold at the end):
1. pattern — every kernel takes its best library pattern (the library is fitted from the
   weights unless given);
2. prune steps, in the rule's order, N:M last — each keeps the top units by norm of what is still
   alive: per layer, per workload (balanced, equal counts) or across a pool of layers (global);
3. quantize — kept weights take their group's nearest codebook value (never 0, so masks hold).
For unstructured/structured pruning alone this is the exact Euclidean projection; with patterns
it is exact for the given library; k-means is Lloyd's greedy fit (see ``codebook``).

Legend: w4 is a weight as (F, C, R, S); unit tensors have the unit grid's part counts as shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.profiler import record_function

from . import codebook, pattern
from .config import ConfigError
from .grid import as4d, block_unview, block_view
from .plan import LayerPlan, Step
from .select import keep_count, topk_mask


@dataclass(slots=True)
class LayerState:
    """What a layer needs to keep satisfying its constraints: masks, pattern library, codebook."""

    mask: torch.Tensor
    """bool, the parameter's shape: True = kept (may be non-zero)."""
    unit_masks: list[Optional[torch.Tensor]] = field(default_factory=list)
    """per prune step: the unit-level mask (unit-grid shape), None for element steps."""
    library: Optional[torch.Tensor] = None
    """pattern library, bool (P, R*S)."""
    codebook: Optional[torch.Tensor] = None
    """(groups, 2^bits) float, rows sorted."""


def _unit_scores(cur4: torch.Tensor, step: Step) -> torch.Tensor:
    """Score of every unit (unit-grid shaped): squared L2 (same order as L2) or L1 norm."""
    if step.unit == tuple(cur4.shape):
        return cur4.abs()
    blocks = block_view(cur4, step.unit)
    s = blocks.abs().sum(1) if step.norm == "l1" else blocks.pow(2).sum(1)
    return s.reshape(step.unit)


def _select_local(scores: torch.Tensor, step: Step) -> torch.Tensor:
    if step.workload is not None:
        rows = block_view(scores, step.workload)
        return block_unview(topk_mask(rows, step.keep), scores.shape, step.workload)
    return topk_mask(scores.reshape(1, -1), step.keep).reshape(scores.shape)


def _select_pool(members: list[tuple[str, torch.Tensor]], fraction: float):
    """One threshold over every member's unit scores; ties go to the earlier member, then index."""
    flat = torch.cat([sc.reshape(-1) for _, sc in members])
    keep = topk_mask(flat[None], keep_count(flat.numel(), density=fraction))[0]
    for (n, sc), part in zip(members, keep.split([sc.numel() for _, sc in members])):
        yield n, part.reshape(sc.shape)


def _expand(unit_mask: torch.Tensor, shape4: tuple[int, ...]) -> torch.Tensor:
    """A unit-level mask as an element mask of ``shape4``."""
    if tuple(unit_mask.shape) == tuple(shape4):
        return unit_mask
    G = unit_mask.numel()
    B = (shape4[0] * shape4[1] * shape4[2] * shape4[3]) // G
    return block_unview(unit_mask.reshape(G, 1).expand(G, B), shape4, tuple(unit_mask.shape))


def _pattern_mask(w4: torch.Tensor, plan: LayerPlan, library: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    F, C, R, S = w4.shape
    energy_NK = w4.reshape(F * C, R * S).pow(2)
    p = plan.pattern
    if library is None:
        if p.library is not None:
            library = pattern.library_from_positions(p.library, R * S)
        else:
            library = pattern.fit_library(energy_NK, p.entries, p.patterns)
    index_N, _ = pattern.assign(energy_NK, library)
    return library[index_N].reshape(F, C, R, S), library


@torch.no_grad()
def project(
    weights: dict[str, torch.Tensor],
    plans: dict[str, LayerPlan],
    libraries: Optional[dict[str, torch.Tensor]] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, LayerState]]:
    """Project every planned weight; returns (projected weights, per-layer state).

    Weights not in ``plans`` are left out of both results. ``libraries`` fixes pattern libraries
    (as during training, where a library is chosen once per stage). A NaN/Inf weight raises
    ``ValueError`` and an empty (0-element) weight ``ConfigError``, each naming the layer.
    """
    libraries = libraries or {}
    for n, plan in plans.items():
        _check_weight(n, plan, weights[n])
    # compute in at least fp32 (bf16/fp16 weights are promoted; fp64 stays fp64)
    w4 = {n: as4d(weights[n].detach()).to(torch.promote_types(weights[n].dtype, torch.float32)) for n in plans}
    mask4: dict[str, torch.Tensor] = {}
    states: dict[str, LayerState] = {}
    for n, plan in plans.items():
        states[n] = LayerState(mask=torch.empty(0))
        if plan.pattern is not None:
            with record_function("elastictrain.pattern"):
                mask4[n], states[n].library = _pattern_mask(w4[n], plan, libraries.get(n))
        else:
            mask4[n] = torch.ones(plan.shape4, dtype=torch.bool)

    for s in range(max((len(p.steps) for p in plans.values()), default=0)):
        pools: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
        for n, plan in plans.items():
            if s >= len(plan.steps):
                continue
            step = plan.steps[s]
            with record_function("elastictrain.prune"):
                scores = _unit_scores(w4[n] * mask4[n], step)
                if step.scope == "global":
                    pools.setdefault(step.pool, []).append((n, scores))
                    continue
                _narrow(states[n], mask4, n, plan, step, _select_local(scores, step))
        for members in pools.values():
            with record_function("elastictrain.prune"):
                for n, unit_mask in _select_pool(members, plans[members[0][0]].steps[s].fraction):
                    _narrow(states[n], mask4, n, plans[n], plans[n].steps[s], unit_mask)

    out: dict[str, torch.Tensor] = {}
    for n, plan in plans.items():
        m4 = mask4[n]
        q4 = torch.where(m4, w4[n], torch.zeros_like(w4[n]))
        if plan.quantize is not None:
            qp = plan.quant_parts
            x_GB, keep_GB = block_view(q4, qp), block_view(m4, qp)
            with record_function("elastictrain.quantize"):
                q_GB, book = codebook.quantize(x_GB, keep_GB, plan.quantize.bits, plan.quantize.method, plan.quantize.iters)
            q4 = block_unview(q_GB, plan.shape4, qp)
            states[n].codebook = book
        out[n] = q4.reshape(plan.shape).to(weights[n].dtype)
        states[n].mask = m4.reshape(plan.shape)
    return out, states


def _check_weight(n: str, plan: LayerPlan, w: torch.Tensor) -> None:
    """Refuse what has no meaningful projection, naming the layer, rather than return NaN or crash."""
    if w.numel() == 0:  # plan time refuses this for rules with a grid; pattern / N:M rules land here
        raise ConfigError(f"rules[{plan.rule}]: {n} has no elements (shape {tuple(w.shape)}): an empty weight "
                          "cannot be constrained (exempt it with a rule that has no constraints)")
    if not bool(torch.isfinite(w).all()):  # NaN has no magnitude to rank; Inf makes codebook values NaN
        bad = ~torch.isfinite(w)
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{n}: {int(bad.sum())} NaN/Inf weight(s), the first at index {first}: a non-finite "
                         "weight cannot be ranked or quantized (has training diverged?)")


def _narrow(state: LayerState, mask4: dict, n: str, plan: LayerPlan, step: Step, unit_mask: torch.Tensor) -> None:
    element = step.unit == plan.shape4
    state.unit_masks.append(None if element else unit_mask)
    mask4[n] = mask4[n] & _expand(unit_mask, plan.shape4)
