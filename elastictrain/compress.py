"""One-shot compression of a state dict with a spec (no training): plan → project → report."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .accounting import report
from .plan import LayerPlan, resolve
from .projection import LayerState, project
from .spec import Spec
from .verify import Violation, verify


@dataclass
class Compressed:
    state_dict: dict[str, torch.Tensor]
    """the full state dict with the planned weights replaced by their projections."""
    states: dict[str, LayerState]
    plans: dict[str, LayerPlan]
    report: dict
    violations: list[Violation]


def compress_state_dict(sd: dict[str, torch.Tensor], spec: Spec, source: str = "spec",
                        libraries: dict[str, torch.Tensor] | None = None) -> Compressed:
    plans = resolve(spec, {k: tuple(v.shape) for k, v in sd.items() if torch.is_floating_point(v)}, source)
    projected, states = project(sd, plans, libraries)
    out = {**sd, **projected}
    libs = {n: s.library for n, s in states.items() if s.library is not None}
    return Compressed(out, states, plans, report(out, plans), verify(plans, out, libs))
