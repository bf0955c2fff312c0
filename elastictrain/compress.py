"""The finish sequence every producer of a compressed model runs, written once: constraints baked
into the weights → ``verify`` (a miss is a bug, never an output) → accounting → the checkpoint
dict. ``compress_state_dict`` is one-shot compression (no training: plan → project → finish);
a training stage bakes with its constrainer and calls ``finish`` on the result."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from elastictrain.checkpoint import compressed_checkpoint
from elastictrain.constraints.plan import LayerPlan, resolve
from elastictrain.constraints.projection import LayerState, project
from elastictrain.constraints.spec import Spec
from elastictrain.constraints.verify import Violation, verify
from elastictrain.measure.accounting import report


@dataclass
class Compressed:
    state_dict: dict[str, torch.Tensor]
    """the full state dict with the planned weights replaced by their projections."""
    states: dict[str, LayerState]
    plans: dict[str, LayerPlan]
    report: dict
    violations: list[Violation]

    def check(self, where: str) -> None:
        """Raise when the output misses its own constraints (a bug in what produced it)."""
        if self.violations:
            raise RuntimeError(f"{where}: output violates its spec: " + "; ".join(map(str, self.violations[:3])))

    def checkpoint(self, spec: Optional[dict], previous: Optional[dict] = None, epoch: int = 0,
                   extra: Optional[dict] = None, where: str = "compressed model") -> dict:
        """The checkpoint dict (``checkpoint.compressed_checkpoint``); checked first (``where``
        names the producer in the error)."""
        self.check(where)
        return compressed_checkpoint(self.state_dict, self.states, spec, previous, epoch, extra)


def finish(sd: dict[str, torch.Tensor], states: dict[str, LayerState], plans: dict[str, LayerPlan]) -> Compressed:
    """Verify and account weights whose constraints are baked in (``states``: each layer's masks,
    library and codebook)."""
    libs = {n: s.library for n, s in states.items() if s.library is not None}
    return Compressed(sd, states, plans, report(sd, plans), verify(plans, {n: sd[n] for n in plans}, libs))


def compress_state_dict(sd: dict[str, torch.Tensor], spec: Spec, source: str = "spec",
                        libraries: dict[str, torch.Tensor] | None = None,
                        couplings: Optional[list[list[str]]] = None) -> Compressed:
    """``couplings``: the model's coupled channel groups (``deploy.coupling``), for a coupled spec."""
    shapes = {k: tuple(v.shape) for k, v in sd.items() if torch.is_floating_point(v)}
    plans = resolve(spec, shapes, source, couplings)
    projected, states = project(sd, plans, libraries)
    return finish({**sd, **projected}, states, plans)
