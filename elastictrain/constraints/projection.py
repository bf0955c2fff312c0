"""The composed projection: weights → nearest weights that satisfy every constraint of their rule.

Order, per layer (each step narrows the previous one's mask, so all hold at the end):
1. pattern — every kernel takes its best library pattern (the library is fitted from the
   weights unless given);
2. prune steps, in the rule's order, N:M last — each keeps the top units by norm of what is still
   alive: per layer, per workload (balanced, equal counts), across a pool of layers (global), or
   per coupled channel group (filter k of every member is one unit, scored by the members' sum);
3. quantize — kept weights take their group's nearest codebook value (never 0, so masks hold).
For unstructured/structured pruning alone this is the exact Euclidean projection; with patterns
it is exact for the given library; k-means is Lloyd's greedy fit (see ``codebook``).

Steps 2–3 are one loop, ``constrain``, over a ``Layout``: how a layer's values are held and
selected. ``Whole`` holds whole weights (``project``); ``distributed.shards.Slices`` holds each
rank's ZeRO-3 slices (``project_shards``). The loop, its order and what it records are shared.

Legend: w4 is a weight as (F, C, R, S); U = a unit-score tensor, the unit grid's part counts as
shape; "layout shape" = however the layout holds a layer's values ((F, C, R, S) or a flat slice).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch
from torch.profiler import record_function

from elastictrain.config import ConfigError
from elastictrain.constraints import codebook, pattern
from elastictrain.constraints.grid import as4d, block_unview, block_view
from elastictrain.constraints.plan import LayerPlan, PruneStep
from elastictrain.constraints.topk import pooled_topk_masks, unit_topk_mask


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


Member = tuple[str, LayerPlan, torch.Tensor]  # a global pool's member: (name, plan, scores)


def is_element(plan: LayerPlan, step: PruneStep) -> bool:
    """A step whose units are single elements (its masks are element masks, recorded as None)."""
    return step.unit == plan.shape4


class Layout(Protocol):
    """How ``constrain`` scores, selects and quantizes a layer's values. Element steps work in the
    layout's shape; a structured step's unit scores and unit masks are whole (unit-grid shaped)
    and, on slices, identical on every rank. Each method may be a collective: on slices every
    rank calls it, in the same order."""

    def scores(self, n: str, plan: LayerPlan, step: PruneStep, cur: torch.Tensor) -> torch.Tensor:
        """Every unit's score in ``cur`` (pruned entries 0, layout shape): |x| for an element step,
        else the unit's L1 norm or squared L2 norm (same order as L2, no square root)."""

    def select(self, plan: LayerPlan, step: PruneStep, scores: torch.Tensor) -> torch.Tensor:
        """The kept units of a ``scope: layer`` step (per workload when balanced) or of a coupled
        group from its members' summed scores, ``scores``' shape."""

    def select_pool(self, step: PruneStep, members: list[Member]) -> list[torch.Tensor]:
        """One threshold over a global pool (every member's step shares ``step.fraction``):
        each member's kept units, its scores' shape."""

    def expand(self, n: str, plan: LayerPlan, keep_U: torch.Tensor) -> torch.Tensor:
        """A structured step's kept units as an element mask in the layout shape."""

    def quantize(self, n: str, plan: LayerPlan, q: torch.Tensor,
                 keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``q``'s kept entries at their group's nearest codebook value, the codebooks (G, L))."""


class Whole:
    """The ``Layout`` of whole weights, each held as w4 (F, C, R, S)."""

    def scores(self, n: str, plan: LayerPlan, step: PruneStep, cur: torch.Tensor) -> torch.Tensor:
        if is_element(plan, step):
            return cur.abs()
        blocks = block_view(cur, step.unit)
        s = blocks.abs().sum(1) if step.norm == "l1" else blocks.pow(2).sum(1)
        return s.reshape(step.unit)

    def select(self, plan: LayerPlan, step: PruneStep, scores: torch.Tensor) -> torch.Tensor:
        return unit_topk_mask(scores, step.keep, step.workload)

    def select_pool(self, step: PruneStep, members: list[Member]) -> list[torch.Tensor]:
        return pooled_topk_masks([sc for _, _, sc in members], step.fraction)

    def expand(self, n: str, plan: LayerPlan, keep_U: torch.Tensor) -> torch.Tensor:
        G = keep_U.numel()  # every unit's flag repeated over the elements of its block
        return block_unview(keep_U.reshape(G, 1).expand(G, plan.params // G), plan.shape4, tuple(keep_U.shape))

    def quantize(self, n: str, plan: LayerPlan, q: torch.Tensor,
                 keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qp, cfg = plan.quant_parts, plan.quantize
        q_GB, book = codebook.quantize(block_view(q, qp), block_view(keep, qp), cfg.bits, cfg.method, cfg.iters)
        return block_unview(q_GB, plan.shape4, qp), book


def constrain(layout: Layout, x: dict[str, torch.Tensor], keep: dict[str, torch.Tensor],
              plans: dict[str, LayerPlan], states: dict[str, LayerState]) -> dict[str, torch.Tensor]:
    """Steps 2–3 for every planned layer: narrows ``keep`` (bool, layout shape) by each prune step
    and fills ``states``' unit masks and codebooks; returns the projected values (pruned entries
    0, quantized where planned) in the layout shape and ``x``'s dtype."""
    for s in range(max((len(p.steps) for p in plans.values()), default=0)):
        pools: dict[tuple, list[Member]] = {}
        for n, plan in plans.items():
            if s >= len(plan.steps):
                continue
            step = plan.steps[s]
            with record_function("elastictrain.prune"):
                scores = layout.scores(n, plan, step, torch.where(keep[n], x[n], torch.zeros_like(x[n])))
                if step.scope != "layer":  # global / coupled: selected below, once every member has its scores
                    pools.setdefault(step.pool, []).append((n, plan, scores))
                    continue
                _narrow(layout, keep, states[n], n, plan, step, layout.select(plan, step, scores))
        for members in pools.values():
            with record_function("elastictrain.prune"):
                kept = _select_together(layout, members[0][1].steps[s], members)
                for (n, plan, _), keep_U in zip(members, kept):
                    _narrow(layout, keep, states[n], n, plan, plan.steps[s], keep_U)

    out: dict[str, torch.Tensor] = {}
    for n, plan in plans.items():
        q = torch.where(keep[n], x[n], torch.zeros_like(x[n]))
        if plan.quantize is not None:
            with record_function("elastictrain.quantize"):
                q, states[n].codebook = layout.quantize(n, plan, q, keep[n])
        out[n] = q
    return out


def _select_together(layout: Layout, step: PruneStep, members: list[Member]) -> list[torch.Tensor]:
    """The kept units of each member of a global pool or a coupled group. A coupled group's members
    all have (F, 1, 1, 1) filter scores, whole on every layout: summed, they select once."""
    if step.scope == "coupled":
        keep_U = layout.select(members[0][1], step, sum(sc for _, _, sc in members))
        return [keep_U] * len(members)
    return layout.select_pool(step, members)


def _narrow(layout: Layout, keep: dict, state: LayerState, n: str, plan: LayerPlan, step: PruneStep,
            keep_U: torch.Tensor) -> None:
    element = is_element(plan, step)  # then keep_U already is an element mask in the layout shape
    state.unit_masks.append(None if element else keep_U)
    keep[n] = keep[n] & (keep_U if element else layout.expand(n, plan, keep_U))


def _pattern_mask(w4: torch.Tensor, plan: LayerPlan,
                  library: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
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
    for n, plan in plans.items():  # step 1, whole weights only: slices cannot hold whole kernels
        states[n] = LayerState(mask=torch.empty(0))
        if plan.pattern is not None:
            with record_function("elastictrain.pattern"):
                mask4[n], states[n].library = _pattern_mask(w4[n], plan, libraries.get(n))
        else:
            mask4[n] = torch.ones(plan.shape4, dtype=torch.bool)
    q4 = constrain(Whole(), w4, mask4, plans, states)
    out: dict[str, torch.Tensor] = {}
    for n, plan in plans.items():
        out[n] = q4[n].reshape(plan.shape).to(weights[n].dtype)
        states[n].mask = mask4[n].reshape(plan.shape)
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
