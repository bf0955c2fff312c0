"""Resolve a spec against a model's parameter shapes: which rule constrains which tensor, and
every grid turned into integer part counts. All checks that need shapes happen here, before any
work starts, and fail with the spec field, the parameter and the reason.

Coupled filter steps also need the model's *couplings*: lists of weight names whose filter k is one
channel k (layers summed into one residual stream, a depthwise conv and its producer), read off its
graph by ``elastictrain.deploy.coupling``. Every member of such a group must prune it with a
coupled step (same position, ratio and norm); their steps then share the pool ``("coupled", first
member)`` and the projection selects the group's channels once.
"""
from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from elastictrain.config import ConfigError
from elastictrain.constraints.grid import AXES, Grid, coarser
from elastictrain.constraints.spec import Pattern, Quantize, Spec
from elastictrain.constraints.topk import keep_count

Parts = tuple[int, int, int, int]
RATIO_TOLERANCE = 0.05  # warn when whole units per workload move a ratio by more than this


@dataclass(slots=True)
class PruneStep:
    """One prune selection on one layer."""

    unit: Parts
    """the unit grid's part counts: the unit-score tensor has this shape."""
    fraction: float
    """fraction of units kept (for a balanced step: of each workload's units)."""
    norm: str
    scope: str
    """layer | global | coupled."""
    pool: tuple
    """global steps with equal ``pool`` share one threshold: (rule, step), or ("pool", name);
    coupled steps with equal ``pool`` ("coupled", first member) are one channel group."""
    workload: Optional[Parts] = None
    """balanced: the workload grid over the unit tensor; every workload keeps ``keep`` units."""
    keep: int = 0
    """units kept per workload (balanced) or per layer (scope: layer); 0 for global steps."""
    at_most: bool = False
    """N:M — a workload keeps at most ``keep`` non-zeros (verify); selection still keeps ``keep``."""

    @property
    def units(self) -> int:
        return self.unit[0] * self.unit[1] * self.unit[2] * self.unit[3]


@dataclass(slots=True)
class LayerPlan:
    name: str
    rule: int
    kind: str  # conv | linear
    shape: tuple[int, ...]  # the parameter's own shape
    shape4: Parts
    steps: list[PruneStep] = field(default_factory=list)
    pattern: Optional[Pattern] = None
    quantize: Optional[Quantize] = None
    quant_parts: Optional[Parts] = None

    @property
    def params(self) -> int:
        return self.shape4[0] * self.shape4[1] * self.shape4[2] * self.shape4[3]

    @property
    def weight_density(self) -> float:
        """The fraction of the layer's weights the plan keeps: every prune step's fraction of its
        units, times the pattern's kept share of a kernel."""
        f = 1.0
        for s in self.steps:
            f *= s.fraction
        if self.pattern is not None:
            f *= self.pattern.entries / (self.shape4[2] * self.shape4[3])
        return f

    @property
    def bits(self) -> int:
        return self.quantize.bits if self.quantize else 32

    @property
    def codebooks(self) -> int:
        q = self.quant_parts
        return q[0] * q[1] * q[2] * q[3] if q else 0


def layer_kind(shape: tuple[int, ...]) -> Optional[str]:
    return {4: "conv", 2: "linear"}.get(len(shape))


def _parts(grid: Grid, shape4: Parts, where: str, name: str) -> Parts:
    try:
        return grid.parts(shape4, name)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None


def resolve(spec: Spec, shapes: dict[str, tuple[int, ...]], source: str = "spec",
            couplings: Optional[Sequence[Sequence[str]]] = None) -> dict[str, LayerPlan]:
    """Plans for every constrainable parameter matched by a non-empty rule, in ``shapes`` order.
    ``couplings``: the model's groups of weights whose filters are tied (see the module docstring);
    without them a coupled step prunes each layer's filters on their own (with a warning)."""
    plans: dict[str, LayerPlan] = {}
    hits = [0] * len(spec.rules)
    fractions: dict[tuple, tuple[float, str, int]] = {}
    try:
        for name, shape in shapes.items():
            kind = layer_kind(tuple(shape))
            if kind is None:
                continue
            for r, rule in enumerate(spec.rules):
                if fnmatch.fnmatchcase(name, rule.match) and rule.layer in (None, kind):
                    hits[r] += 1
                    if not rule.empty:
                        plans[name] = _plan(r, rule, name, kind, tuple(shape))
                        _check_pools(plans[name], fractions)
                    break
        for r, n in enumerate(hits):
            if n == 0:
                rule = spec.rules[r]
                what = f"{rule.layer} " if rule.layer else "conv/linear "
                raise ConfigError(f"rules[{r}].match: {rule.match!r} matches no {what}parameter "
                                  "(or only ones an earlier rule already took)")
        if spec.coupled:
            _couple(spec, plans, shapes, couplings)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return plans


def _plan(r: int, rule, name: str, kind: str, shape: tuple[int, ...]) -> LayerPlan:
    where = f"rules[{r}]"
    shape4: Parts = tuple(shape) + (1,) * (4 - len(shape))  # type: ignore[assignment]
    plan = LayerPlan(name, r, kind, tuple(shape), shape4, pattern=rule.pattern, quantize=rule.quantize)
    if rule.pattern is not None:
        K = shape4[2] * shape4[3]
        if kind != "conv":
            raise ConfigError(f"{where}.pattern: {name} is a linear weight; pattern pruning needs k×k conv kernels")
        if rule.pattern.entries > K:
            raise ConfigError(f"{where}.pattern.entries: {rule.pattern.entries} > {K} positions of a "
                              f"{shape4[2]}×{shape4[3]} kernel in {name}")
        for i, pos in enumerate(rule.pattern.library or []):
            if max(pos) >= K:
                raise ConfigError(f"{where}.pattern.library[{i}]: position {max(pos)} outside a "
                                  f"{shape4[2]}×{shape4[3]} kernel in {name}")
    work = _parts(rule.balance, shape4, f"{where}.balance", name) if rule.balance is not None else None
    multi = len(rule.prunes) > 1
    for s, p in enumerate(rule.prunes):
        pw = f"{where}.prune[{s}]" if multi else f"{where}.prune"
        unit = _parts(p.grid, shape4, f"{pw}.unit", name)
        step = PruneStep(unit, p.unit_density, p.norm, p.scope, ("pool", p.pool) if p.pool else (r, s))
        if work is not None:
            if not coarser(work, unit):
                raise ConfigError(f"{where}.balance: workloads ({rule.balance.describe()}) of {name} do not "
                                  f"contain whole units of {pw}.unit")
            step.workload = work
            per = step.units // (work[0] * work[1] * work[2] * work[3])
            step.keep = keep_count(per, density=p.unit_density)  # rounded down, at least 1
            got = per / step.keep
            if abs(got * p.unit_density - 1) > RATIO_TOLERANCE:
                less = " (at least one unit per workload)" if got * p.unit_density < 1 else ""
                warnings.warn(f"{where}.balance: {name} keeps {step.keep} of {per} units per workload, "
                              f"{got:g}× instead of {1 / p.unit_density:g}× (equal counts need whole units){less}",
                              stacklevel=2)
        elif p.scope == "layer":
            step.keep = keep_count(step.units, density=p.unit_density)
        plan.steps.append(step)
    if rule.nm is not None:
        n, m = rule.nm.n, rule.nm.m
        if shape4[1] % m:
            raise ConfigError(f"{where}.nm: m={m} does not divide the channel axis of {name} (size {shape4[1]})")
        unit = (shape4[0], shape4[1], shape4[2], shape4[3])
        work = (shape4[0], shape4[1] // m, shape4[2], shape4[3])
        plan.steps.append(PruneStep(unit, n / m, "l2", "layer", (r, len(rule.prunes)), work, n, at_most=True))
    if rule.quantize is not None:
        plan.quant_parts = _parts(rule.quantize.grid, shape4, f"{where}.quantize.groups", name)
    return plan


def _couple(spec: Spec, plans: dict[str, LayerPlan], shapes: dict, couplings) -> None:
    """Turn coupled steps into group selections: one pool per coupling group, each layer outside
    every group a group of its own. A group that a coupled step touches must be coupled whole."""
    if couplings is None:
        warnings.warn("prune.coupled: no coupling groups given (a pipeline stage reads them off the model's "
                      "graph); each layer's filters are pruned on their own", stacklevel=3)
        couplings = []
    grouped: set[str] = set()
    for names in couplings:
        names = list(names)
        for n in names:
            if n not in shapes:
                raise ConfigError(f"prune.coupled: the coupling group of {names[0]} names {n}, which this model "
                                  "does not have (couplings from another model?)")
        steps = {n: _coupled_step(spec, plans[n]) for n in names if n in plans}
        have = [n for n in names if steps.get(n) is not None]
        if not have or len(names) < 2:
            continue
        first = plans[have[0]]
        where = f"rules[{first.rule}].prune" + (f"[{steps[have[0]]}]" if len(spec.rules[first.rule].prunes) > 1
                                                 else "") + ".coupled"
        missing = [n for n in names if steps.get(n) is None]
        if missing:
            why = "; ".join(_why_not(spec, plans, shapes, n) for n in missing)
            raise ConfigError(f"{where}: {have[0]} shares its output channels with {len(names) - 1} other layer(s) "
                              f"(a residual sum or a depthwise conv), so the group needs coupled filter pruning on "
                              f"all of {', '.join(names)}; {why}")
        for n in names:
            s, plan = steps[n], plans[n]
            mine, ref = plan.steps[s], first.steps[steps[have[0]]]
            if s != steps[have[0]] or mine.fraction != ref.fraction or mine.norm != ref.norm:
                raise ConfigError(f"{where}: {n} (rules[{plan.rule}]) prunes the coupled group of {have[0]} "
                                  f"as step {s}, {1 / mine.fraction:g}×, {mine.norm}; {have[0]} as step "
                                  f"{steps[have[0]]}, {1 / ref.fraction:g}×, {ref.norm} (one group needs one "
                                  "position, ratio and norm)")
            if plan.shape4[0] != first.shape4[0]:
                raise ConfigError(f"{where}: {n} has {plan.shape4[0]} filters, {have[0]} {first.shape4[0]}: "
                                  "not one channel group (couplings from another model?)")
            mine.scope, mine.pool = "coupled", ("coupled", names[0])
            grouped.add(n)
    for n, plan in plans.items():  # a layer no group ties: its filters are a group of their own
        s = _coupled_step(spec, plan)
        if s is not None and n not in grouped:
            plan.steps[s].scope, plan.steps[s].pool = "coupled", ("coupled", n)


def _coupled_step(spec: Spec, plan: LayerPlan) -> Optional[int]:
    return spec.rules[plan.rule].coupled_step if plan.rule >= 0 else None


def _why_not(spec: Spec, plans: dict[str, LayerPlan], shapes: dict, name: str) -> str:
    plan = plans.get(name)
    if plan is not None:
        return f"{name} has no coupled filter step (rules[{plan.rule}])"
    kind = layer_kind(tuple(shapes[name]))
    for r, rule in enumerate(spec.rules):
        if fnmatch.fnmatchcase(name, rule.match) and rule.layer in (None, kind):
            return f"{name} is exempt (rules[{r}] has no constraint)"
    return f"{name} is matched by no rule"


def _check_pools(plan: LayerPlan, fractions: dict) -> None:
    for s, step in enumerate(plan.steps):
        if step.scope != "global":
            continue
        where = f"rules[{plan.rule}].prune" + (f"[{s}]" if len(plan.steps) > 1 else "")
        seen = fractions.setdefault(step.pool, (step.fraction, where, s))
        if seen[2] != s:  # the projection pools global steps position by position
            raise ConfigError(f"{where}.pool: pool {step.pool[1]!r} is prune step {s} here "
                              f"but step {seen[2]} at {seen[1]}")
        if seen[0] != step.fraction:
            raise ConfigError(f"{where}.pool: pool {step.pool[1]!r} keeps {1 / step.fraction:g}× here but "
                              f"{1 / seen[0]:g}× at {seen[1]} (one threshold needs one ratio)")


def pool_name(pool: tuple) -> str:
    if pool[0] == "coupled":
        return f"prune.coupled (the group of {pool[1]})"
    return f"prune.pool {pool[1]!r}" if pool[0] == "pool" else f"rules[{pool[0]}].prune"


def describe_grid(parts: Parts) -> str:
    return " × ".join(f"{a} {p}" for a, p in zip(AXES, parts) if p > 1) or "whole layer"
