"""Coupled filter pruning's view of the graph: which weights' filters are one channel, and which
1-D parameters must be zero where such a channel is pruned.

``graph`` ties channels into groups (a residual sum makes its operands' channels one; a depthwise
conv passes channel k straight through). For training, a group becomes plain parameter names:
- its *members*: the conv / linear weights that write it and the depthwise convs on it, filter k of
  each being the group's channel k. ``prune: {unit: filter, coupled: true}`` keeps or drops
  channel k in all of them at once (``constraints.plan`` resolves the groups of two or more);
- its *followers*: the BatchNorm weights and biases on it and the members' own biases. Zeroed where
  every member's filter k is pruned, they make the channel exactly 0 everywhere — not the constant a
  BatchNorm shift would leave, which a zero-padded conv cannot absorb — so ``shrink`` removes it.
A layer whose channel axis holds several groups or spreads one over features (a depthwise conv or a
BatchNorm after a concatenation or a flatten) is left out of both: it is pruned, or not, on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from elastictrain.deploy.graph import Layout, analyse, trace


@dataclass
class Coupling:
    groups: list[list[str]] = field(default_factory=list)
    """weight names whose filters are one channel group, for every group of two or more members
    (the ``couplings`` of ``constraints.plan.resolve``; plain lists, as checkpoints store them)."""
    followers: dict[str, list[str]] = field(default_factory=dict)
    """1-D parameter → the member weights of its group: entry k goes when all of them prune filter k."""


def coupling(model: nn.Module, example_input: torch.Tensor) -> Coupling:
    """The coupled groups of ``model``'s weights and their followers, read off the graph traced on
    ``example_input`` (``UntraceableModel`` / ``ValueError`` as for ``shrink``)."""
    cg = analyse(trace(model, example_input))
    members: dict[int, list[str]] = {}  # group root -> member weights, in execution order
    on: dict[int, list[str]] = {}  # group root -> 1-D parameters indexed by its channels
    for s in cg.sliced.values():
        root = _whole_group(cg, s.src if s.kind == "batchnorm" else s.dst)
        if root is None:
            continue
        mod = cg.gm.get_submodule(s.name)
        if s.kind == "batchnorm":
            on.setdefault(root, []).extend(f"{s.name}.{p}" for p in ("weight", "bias") if getattr(mod, p) is not None)
            continue
        members.setdefault(root, []).append(f"{s.name}.weight")
        if mod.bias is not None:
            on.setdefault(root, []).append(f"{s.name}.bias")
    followers = {p: members[r] for r in sorted(on) if r in members for p in on[r]}
    return Coupling([members[r] for r in sorted(members) if len(members[r]) > 1], followers)


def _whole_group(cg, layout: Layout):
    """The group a channel axis is, when it is exactly one group (channel k = the group's k), else None."""
    if len(layout) != 1 or layout[0].offset != 0 or layout[0].inner != 1:
        return None
    return cg.find(layout[0].space)
