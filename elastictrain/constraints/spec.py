"""The user-facing compression spec: ordered rules mapping parameters to constraint mixtures.

```yaml
rules:
  - match: "features.*.weight"      # glob on parameter names; the first matching rule applies
    layer: conv                     # optional filter: conv | linear
    prune: {unit: kernel, ratio: 100}       # or a list of such steps, applied in order
                                            # {unit: filter, ratio: 4, coupled: true}: see Prune.coupled
    pattern: {entries: 4, patterns: 8}
    balance: {filter: 16, channel: 4}       # equal non-zeros (or kept units) per workload
    quantize: {bits: 2, groups: {filter: 16, channel: 4}}
  - match: "classifier.weight"
    nm: "2:4"                       # N:M sparsity along the input axis, by name
```
A rule with no constraint exempts what it matches (e.g. keep the first conv dense). Only conv
(4-D) and linear (2-D) weights are constrainable; 1-D parameters (biases, norms) are never matched.
This module checks what can be checked from the file alone; ``plan.resolve`` checks the rest
against the model's shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from elastictrain.config import ConfigError, build, fail, load_yaml
from elastictrain.constraints.grid import NAMED_UNITS, Grid

Unit = Union[str, Grid]


@dataclass(slots=True)
class Prune:
    """One pruning selection: keep the largest units (by norm) of a layer, or of all layers."""

    unit: Unit = "element"
    """element | kernel | filter | channel | a grid such as {filter: each, channel: 4}."""
    ratio: Optional[float] = None
    """units before / units kept (50 keeps 2%); give this or ``density``."""
    density: Optional[float] = None
    """fraction of units kept, in (0, 1]."""
    scope: Literal["layer", "global"] = "layer"
    """global: one threshold across every parameter this rule matches."""
    norm: Literal["l2", "l1"] = "l2"
    """how a unit of several elements is scored."""
    pool: Optional[str] = None
    """global steps of several rules with the same pool name share one threshold (same ratio)."""
    coupled: bool = False
    """filter steps only: channels that the model's graph ties together (summed into one residual
    stream, or passed through a depthwise conv) are one unit across their layers, scored by the sum
    of their filters' norms and kept or pruned together; the BatchNorm entries and biases of a
    pruned channel are zeroed with it, so deployment can remove it. Needs the model (a pipeline
    stage reads the groups off its graph)."""

    def __post_init__(self) -> None:
        if isinstance(self.unit, str) and self.unit not in NAMED_UNITS:
            fail("unit", f"unknown unit {self.unit!r} (expected one of {', '.join(NAMED_UNITS)} or a grid)")
        if (self.ratio is None) == (self.density is None):
            fail("ratio", "give exactly one of ratio or density")
        if self.ratio is not None and not self.ratio >= 1:
            fail("ratio", f"must be >= 1 (got {self.ratio})")
        if self.density is not None and not 0 < self.density <= 1:
            fail("density", f"must be in (0, 1] (got {self.density})")
        if self.pool is not None and self.scope != "global":
            fail("pool", "only global steps share a pool (set scope: global)")
        if self.coupled and self.grid != NAMED_UNITS["filter"]:
            fail("coupled", "couples layers' output channels, so it needs unit: filter "
                 f"(got {self.unit if isinstance(self.unit, str) else self.unit.describe()})")
        if self.coupled and self.scope != "layer":
            fail("coupled", "a coupled group is selected on its own; it cannot share a global threshold")

    @property
    def grid(self) -> Grid:
        return NAMED_UNITS[self.unit] if isinstance(self.unit, str) else self.unit

    @property
    def unit_density(self) -> float:
        """The fraction of units this step keeps (``density``, or 1 / ``ratio``)."""
        return self.density if self.density is not None else 1.0 / self.ratio  # type: ignore[operator]


@dataclass(slots=True)
class Pattern:
    """k×k kernels keep exactly ``entries`` positions from a library of ``patterns`` patterns."""

    entries: int
    """positions kept in every surviving kernel."""
    patterns: int = 8
    """library size; the library is fitted from the weights unless ``library`` is given."""
    library: Optional[list[list[int]]] = None
    """explicit library: each pattern a list of kept positions (row-major in the kernel)."""

    def __post_init__(self) -> None:
        if self.entries < 1:
            fail("entries", f"must be >= 1 (got {self.entries})")
        if self.patterns < 1:
            fail("patterns", f"must be >= 1 (got {self.patterns})")
        if self.library is not None:
            if not self.library:
                fail("library", "must not be empty")
            if len(self.library) > self.patterns:
                fail("library", f"holds {len(self.library)} patterns, more than patterns={self.patterns}")
            for i, pos in enumerate(self.library):
                if len(set(pos)) != self.entries or len(pos) != self.entries:
                    fail(f"library[{i}]", f"must list {self.entries} distinct positions (got {pos})")
                if min(pos) < 0:
                    fail(f"library[{i}]", f"positions must be >= 0 (got {pos})")


@dataclass(slots=True)
class NM:
    """N:M sparsity: at most ``n`` non-zeros in every ``m`` consecutive input channels."""

    n: int
    m: int

    @classmethod
    def _coerce(cls, value):
        if isinstance(value, str):
            parts = value.split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"expected 'N:M' such as '2:4' (got {value!r})")
            return {"n": int(parts[0]), "m": int(parts[1])}
        return value

    def __post_init__(self) -> None:
        if not 1 <= self.n <= self.m:
            fail("n", f"must satisfy 1 <= n <= m (got {self.n}:{self.m})")


@dataclass(slots=True)
class Quantize:
    """Multi-codebook quantization: each group's kept weights take one of 2^bits values."""

    bits: int
    """code width, 1..8 (zero is reserved for pruned weights and costs no code)."""
    groups: Optional[Grid] = None
    """one codebook per block of this grid; absent = one codebook per layer."""
    method: Literal["kmeans", "uniform"] = "kmeans"
    iters: int = 30
    """most Lloyd iterations of the k-means fit."""

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            fail("bits", f"must be 1..8 (got {self.bits})")
        if self.iters < 1:
            fail("iters", f"must be >= 1 (got {self.iters})")

    @property
    def grid(self) -> Grid:
        return self.groups if self.groups is not None else Grid()


@dataclass(slots=True)
class Rule:
    match: str
    """glob on parameter names (fnmatch: ``*`` also crosses dots)."""
    layer: Optional[Literal["conv", "linear"]] = None
    prune: Union[Prune, list[Prune], None] = None
    pattern: Optional[Pattern] = None
    balance: Optional[Grid] = None
    nm: Optional[NM] = None
    quantize: Optional[Quantize] = None

    def __post_init__(self) -> None:
        if isinstance(self.prune, Prune):
            self.prune = [self.prune]
        if self.balance is not None and self.nm is not None:
            fail("nm", "cannot be combined with balance (N:M is itself a balance)")
        for i, p in enumerate(self.prunes):
            if p.scope == "global" and (self.balance is not None or self.nm is not None):
                fail(f"prune[{i}].scope" if len(self.prunes) > 1 else "prune.scope",
                     "global scope cannot be combined with balance or nm (equal counts per workload are per layer)")
        if self.pattern is not None and self.layer == "linear":
            fail("pattern", "pattern pruning needs conv kernels, but the rule is for linear layers")
        if self.balance is not None and not self.prunes:
            fail("balance", "needs a prune step to balance")
        coupled = [i for i, p in enumerate(self.prunes) if p.coupled]
        if coupled and self.balance is not None:
            fail("balance", "cannot be combined with a coupled step (a group spans several layers' workloads)")
        if len(coupled) > 1:
            fail(f"prune[{coupled[1]}].coupled", "one coupled step per rule")

    @property
    def prunes(self) -> list[Prune]:
        return self.prune or []  # type: ignore[return-value]

    @property
    def empty(self) -> bool:
        return not (self.prunes or self.pattern or self.nm or self.quantize)

    @property
    def coupled_step(self) -> Optional[int]:
        """The index of the rule's coupled prune step, if it has one."""
        return next((i for i, p in enumerate(self.prunes) if p.coupled), None)


@dataclass(slots=True)
class Spec:
    rules: list[Rule] = field(default_factory=list)
    version: int = 1
    name: str = ""

    def __post_init__(self) -> None:
        if self.version != 1:
            fail("version", f"unsupported spec version {self.version} (this release reads 1)")
        if not self.rules:
            fail("rules", "must hold at least one rule")

    @property
    def coupled(self) -> bool:
        """Whether any rule prunes coupled filters (resolving it then needs the model's coupling groups)."""
        return any(r.coupled_step is not None for r in self.rules)


def parse(data: object, source: str = "spec") -> Spec:
    """A Spec from parsed YAML; errors read ``SOURCE: rules[0].prune.ratio: must be >= 1 (got 0.5)``."""
    try:
        return build(Spec, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load(path: str | Path) -> Spec:
    return parse(load_yaml(path), str(path))
