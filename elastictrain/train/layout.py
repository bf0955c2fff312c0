"""Where a rank's copy of each constrained weight lives, as the constrainer sees it.

The constrainer reads and writes weights only through a layout's flat ``local`` view and projects
through ``project``, so the same step logic serves two layouts:
- ``Whole``: every rank holds every weight whole (one process, DDP, DeepSpeed ZeRO 0–2);
- ``Sharded``: each rank holds a contiguous slice of every weight (ZeRO-3). Projection runs on
  the slices (``distributed.shards``); masks stay whole on every rank (1 bit a weight when packed), since
  gradients arrive whole-shaped before they are reduce-scattered.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from elastictrain.constraints import codebook
from elastictrain.constraints.grid import as4d
from elastictrain.constraints.plan import LayerPlan
from elastictrain.constraints.projection import LayerState, project


class Whole:
    sharded = False

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params

    def local(self, n: str) -> tuple[torch.Tensor, int]:
        """(flat view of the values this rank holds, their offset in the flattened weight)."""
        return self.params[n].detach().view(-1), 0

    def project(self, plans: dict[str, LayerPlan], libraries: Optional[dict] = None,
                values: Optional[dict[str, torch.Tensor]] = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, LayerState]]:
        """Projected local values (flat) and per-layer states; ``values`` replaces the weights."""
        weights = values if values is not None else {n: self.params[n].detach() for n in plans}
        out, states = project(weights, plans, libraries)
        return {n: w.reshape(-1) for n, w in out.items()}, states

    def kept(self, mask: torch.Tensor, plan: LayerPlan, n: str):
        return codebook.KeptIndex(as4d(mask), plan.quant_parts)

    def release(self) -> None:
        """Called before the constrainer writes local values (nothing to do for whole weights)."""


class Sharded:
    """``local(n)`` gives the rank's ``distributed.shards.Shard`` of weight ``n``; ``release()`` drops any
    gathered whole copy (ZeRO-3 keeps some after a forward without grad), so the next forward
    re-gathers what the constrainer wrote into the slices."""

    sharded = True

    def __init__(self, local: Callable[[str], "object"], release: Callable[[], None] = lambda: None, group=None):
        self._local, self._release, self.group = local, release, group

    def local(self, n: str) -> tuple[torch.Tensor, int]:
        sh = self._local(n)
        return sh.values, sh.start

    def project(self, plans, libraries=None, values=None):
        from elastictrain.distributed.shards import project_shards

        if values is not None:
            raise ValueError("a sharded layout projects only the weights themselves (ADMM needs ZeRO 0–2)")
        return project_shards({n: self._local(n) for n in plans}, plans, self.group)

    def kept(self, mask: torch.Tensor, plan: LayerPlan, n: str):
        from elastictrain.distributed.shards import ShardKept

        sh = self._local(n)
        keep_n = mask.reshape(-1).narrow(0, sh.start, sh.values.numel())
        return ShardKept(keep_n, sh.start, plan.shape4, plan.quant_parts, self.group)

    def release(self) -> None:
        self._release()
