"""Density schedules: how a prune target is approached over a stage.

Zhu & Gupta (2017) prune gradually: the kept fraction falls from 1 to the target ``f`` as
``f + (1 − f)·(1 − p)^3`` over progress ``p ∈ [0, 1]`` — fast at first, while many weights are
redundant, then slowly. ``plans_at`` applies a schedule to resolved plans; every step's count at
``p < 1`` is at least its final count, so a later, sparser mask is always reachable.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from elastictrain.constraints.plan import LayerPlan, PruneStep
from elastictrain.constraints.topk import keep_count

Schedule = Literal["cubic", "linear", "oneshot"]


def density_at(target: float, progress: float, kind: Schedule = "cubic") -> float:
    """The fraction of units kept at ``progress`` on the way to ``target``."""
    p = min(max(progress, 0.0), 1.0)
    remaining = {"cubic": (1 - p) ** 3, "linear": 1 - p, "oneshot": 0.0}[kind]
    return target + (1 - target) * remaining


def _step_at(step: PruneStep, progress: float, kind: Schedule) -> PruneStep:
    f = density_at(step.fraction, progress, kind)
    if step.scope == "global":
        return dataclasses.replace(step, fraction=f)
    if step.workload is not None:
        per = step.units // (step.workload[0] * step.workload[1] * step.workload[2] * step.workload[3])
    else:
        per = step.units
    return dataclasses.replace(step, fraction=f, keep=max(step.keep, keep_count(per, density=f)))


def plans_at(plans: dict[str, LayerPlan], progress: float, kind: Schedule = "cubic") -> dict[str, LayerPlan]:
    """The plans with every prune step's kept fraction at ``progress`` of the schedule."""
    if progress >= 1.0 or kind == "oneshot":
        return plans
    return {n: dataclasses.replace(p, steps=[_step_at(s, progress, kind) for s in p.steps]) for n, p in plans.items()}
