"""An independent check that weights satisfy their spec — counted from the weights alone.

Nothing here reuses the selection code: it counts non-zeros, non-zero units, distinct supports and
distinct values, and compares them with what the plan promises. Each failure names the parameter,
the spec field and where in the tensor it fails.

Weights satisfy a plan when *some* mask that satisfies it covers their non-zeros: a kept weight may
be exactly 0 (a workload with fewer non-zero units than it keeps, a kernel with fewer non-zeros than
its pattern's ``entries``), which weights alone cannot tell from a pruned one. So kept counts are
upper bounds — a workload keeps at most ``keep`` units, a kernel's support lies within a library
pattern, a coupled group has at most ``keep`` channels with a non-zero filter in any member — as
they already were for a layer's ``prune`` and for N:M. Without the library, a kernel with fewer than
``entries`` non-zeros that lies within no full-size support counts as a pattern of its own
(conservative: pass the library for the exact check). NaN/Inf weights always fail.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from elastictrain.constraints.grid import as4d, block_view
from elastictrain.constraints.pattern import codes_of, library_from_positions
from elastictrain.constraints.plan import LayerPlan, PruneStep, pool_name
from elastictrain.constraints.topk import keep_count


@dataclass(frozen=True, slots=True)
class Violation:
    name: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.name}: {self.field}: {self.message}"


def _alive_units(w4: torch.Tensor, step: PruneStep) -> torch.Tensor:
    """bool, unit-grid shaped: which units hold any non-zero."""
    return block_view(w4 != 0, step.unit).any(1).reshape(step.unit)


def _field(plan: LayerPlan, step_index: int, key: str) -> str:
    r = f"rules[{plan.rule}]"
    if step_index >= len(plan.steps) - (1 if plan.steps and plan.steps[-1].at_most else 0):
        return f"{r}.nm"
    return f"{r}.{key}"


def _within(codes: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """bool per code: its support is a subset of some pattern's support."""
    if patterns.numel() == 0:
        return torch.zeros_like(codes, dtype=torch.bool)
    return ((codes[:, None] & ~patterns[None, :]) == 0).any(1)


def _check_layer(name: str, plan: LayerPlan, w4: torch.Tensor, library: Optional[torch.Tensor]) -> list[Violation]:
    out: list[Violation] = []
    r = f"rules[{plan.rule}]"
    if plan.pattern is not None:
        F, C, R, S = w4.shape
        entries = plan.pattern.entries
        support = (w4 != 0).reshape(F * C, R * S)
        counts = support.sum(1)
        bad = (counts > entries).nonzero()
        if bad.numel():
            k = int(bad[0])
            out.append(Violation(name, f"{r}.pattern.entries", f"kernel (filter {k // C}, channel {k % C}) keeps "
                                 f"{int(counts[k])} positions > {entries}"))
        codes = codes_of(support[counts > 0]).unique()
        full = codes_of(support[counts == entries]).unique()
        if library is None and plan.pattern.library is not None:
            library = library_from_positions(plan.pattern.library, R * S)
        if library is not None:
            outside = codes[~_within(codes, codes_of(library))]
            if outside.numel():
                out.append(Violation(name, f"{r}.pattern.library",
                                     f"{outside.numel()} kernel supports lie within no library pattern"))
            used = library.shape[0]
        else:  # full-size supports, plus smaller ones that lie within none of them
            used = full.numel() + int((~_within(codes, full)).sum())
        if used > plan.pattern.patterns:
            out.append(Violation(name, f"{r}.pattern.patterns",
                                 f"{used} distinct kernel supports > {plan.pattern.patterns}"))
    for s, step in enumerate(plan.steps):
        if step.scope == "global":
            continue  # checked over the whole pool
        alive = _alive_units(w4, step)
        if step.workload is None:
            n = int(alive.sum())
            if n > step.keep:
                out.append(Violation(name, _field(plan, s, f"prune[{s}]"), f"{n} units non-zero > {step.keep} allowed"))
            continue
        per = block_view(alive, step.workload).sum(1)
        key = _field(plan, s, "balance")
        # at most `keep` per workload: a workload with fewer non-zero units keeps zero-valued ones
        if int(per.max()) > step.keep:
            lo, hi = int(per.argmin()), int(per.argmax())
            if step.at_most:
                out.append(Violation(name, key, f"block {hi} holds {int(per[hi])} non-zeros > n={step.keep}"))
            else:
                out.append(Violation(name, key, f"kept units per workload differ or exceed {step.keep}: "
                                     f"workload {lo} has {int(per[lo])}, workload {hi} has {int(per[hi])}"))
    if plan.quantize is not None:
        x_GB = block_view(w4, plan.quant_parts)
        L = 1 << plan.quantize.bits
        s = x_GB.sort(1).values
        # a sorted row: count each change to a non-zero value, plus a non-zero first value (0 never counts)
        distinct = ((s[:, 1:] != s[:, :-1]) & (s[:, 1:] != 0)).sum(1) + (s[:, 0] != 0).long()
        if bool((distinct > L).any()):
            g = int(distinct.argmax())
            out.append(Violation(name, f"{r}.quantize.bits",
                                 f"group {g} holds {int(distinct[g])} distinct non-zero values "
                                 f"> 2^{plan.quantize.bits}"))
    return out


def verify(plans: dict[str, LayerPlan], weights: dict[str, torch.Tensor],
           libraries: Optional[dict[str, torch.Tensor]] = None) -> list[Violation]:
    """All violations of ``plans`` by ``weights`` (empty list = every constraint holds)."""
    libraries = libraries or {}
    out: list[Violation] = []
    pools: dict[tuple, list[tuple[str, PruneStep, torch.Tensor]]] = {}
    for name, plan in plans.items():
        if name not in weights:
            out.append(Violation(name, f"rules[{plan.rule}].match", "parameter missing from the weights"))
            continue
        w4 = as4d(weights[name].detach()).float()
        if tuple(w4.shape) != plan.shape4:
            out.append(Violation(name, f"rules[{plan.rule}]",
                                 f"shape {tuple(weights[name].shape)} != planned {plan.shape}"))
            continue
        if w4.numel() == 0:  # as projection refuses it (and grids of a 0-size axis cannot be cut)
            out.append(Violation(name, f"rules[{plan.rule}]", "an empty weight cannot be constrained"))
            continue
        nonfinite = int((~torch.isfinite(weights[name].detach())).sum())
        if nonfinite:
            out.append(Violation(name, f"rules[{plan.rule}]", f"{nonfinite} NaN/Inf weights"))
            continue
        out += _check_layer(name, plan, w4, libraries.get(name))
        for step in plan.steps:
            if step.scope in ("global", "coupled"):
                pools.setdefault(step.pool, []).append((name, step, _alive_units(w4, step)))
    for key, members in pools.items():
        if members[0][1].scope == "coupled":  # a channel is alive when any member's filter is
            alive = int(torch.stack([a for _, _, a in members]).any(0).sum())
            if alive > members[0][1].keep:
                out.append(Violation(", ".join(n for n, _, _ in members), pool_name(key),
                                     f"{alive} channels non-zero in some member > {members[0][1].keep} allowed"))
            continue
        units = sum(st.units for _, st, _ in members)
        alive = sum(int(a.sum()) for _, _, a in members)
        allowed = keep_count(units, density=members[0][1].fraction)
        if alive > allowed:
            names = ", ".join(n for n, _, _ in members[:3]) + (", …" if len(members) > 3 else "")
            out.append(Violation(names, pool_name(key),
                                 f"{alive} units non-zero over the global pool > {allowed} allowed"))
    return out
