"""Which channels go, which stay and why — and ``shrink``, which builds the smaller model.

A channel of a group goes when nothing can tell it is gone: every conv / linear reading a tensor
that carries it either ignores it (its weights there are all zero) or sees a constant it can absorb
into its bias (any constant for a linear or an unpadded conv; only 0 for a zero-padded conv, whose
border would differ), and neither the model output nor an op deploy cannot slice reads it. This is
dead-value elimination, so the producers' filters need not be zero: a channel that every consumer
dropped goes too, with its producers' filters. Channels that look pruned (a zero filter, a zero
input slice) but stay are reported per layer with the reason — usually coupling through a residual
sum, or a constant that meets zero padding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from elastictrain.deploy.constants import Blur, Const, propagate, zero_padded
from elastictrain.deploy.graph import ChannelGraph, Segment, Sliced, analyse, trace
from elastictrain.deploy.rebuild import rebuild
from elastictrain.deploy.report import Kept, ShrinkReport, build_report, measure

# The shrunk model must reproduce the original to this (max abs, relative to the largest output).
TOLERANCE = 1e-4


@dataclass
class Probe:
    """What one reading layer makes of one segment of its input: per channel (C,) masks."""
    read: Sliced
    seg: Segment
    idx: torch.Tensor      # (C, inner) feature indices of each channel
    dead: torch.Tensor     # the layer's weights on the channel are all zero
    known: torch.Tensor    # the channel is a known constant there
    value: torch.Tensor    # that constant (its first feature's)
    ok: torch.Tensor       # the layer can do without it


@dataclass
class Decision:
    keep: dict[int, torch.Tensor]                      # group root -> kept channel indices
    folds: dict[str, torch.Tensor] = field(default_factory=dict)  # reading layer -> (out,) constant to add
    kept: list[Kept] = field(default_factory=list)


def decide(cg: ChannelGraph, consts: dict, blurs: dict[str, Blur], align: int = 1) -> Decision:
    groups = cg.groups()
    removable = {r: torch.full((cg.sizes[r],), not cg.is_fixed(r)) for r in groups}
    probes = [p for read in cg.reads() for p in _probe(cg, read, consts[read.node.args[0]])]
    for p in probes:
        removable[cg.find(p.seg.space)] &= p.ok
    keep, padded = {}, {}
    for r, gone in removable.items():
        if bool(gone.all()):
            gone[0] = False  # a group never empties: zero-width layers are not valid modules
        short = min(cg.sizes[r], -(-int((~gone).sum()) // align) * align) - int((~gone).sum())
        if short > 0:  # keeping a removable channel is always exact: round the width up to the alignment
            back = gone.nonzero().flatten()[:short]
            gone[back] = False
            padded[r] = set(back.tolist())
        keep[r] = (~gone).nonzero().flatten()
    decision = Decision(keep)
    for p in probes:  # constants of removed channels move into the reading layer's bias
        gone = removable[cg.find(p.seg.space)]
        sel = p.idx[gone & ~p.dead].flatten()
        if len(sel):
            w = cg.gm.get_submodule(p.read.name).weight.detach()
            w_OF = w.sum((2, 3)) if w.dim() == 4 else w  # what a constant 1 on a feature adds to each output
            value = consts[p.read.node.args[0]].value
            delta = (w_OF[:, sel] * value[sel]).sum(1)
            decision.folds[p.read.name] = decision.folds.get(p.read.name, 0) + delta
    decision.kept = _explain(cg, probes, removable, blurs, padded, align)
    return decision


def _probe(cg: ChannelGraph, read: Sliced, c: Const) -> list[Probe]:
    mod = cg.gm.get_submodule(read.name)
    w = mod.weight.detach()
    dead_F = ((w.flatten(2) == 0).all(2).all(0) if w.dim() == 4 else (w == 0).all(0)).cpu()
    known_F, value_F = c.known.cpu(), c.value.cpu()  # decisions are made on the CPU, whatever the model's device
    padded = isinstance(mod, nn.Conv2d) and zero_padded(mod)
    out = []
    for seg in read.src:
        idx = seg.offset + torch.arange(seg.size)[:, None] * seg.inner + torch.arange(seg.inner)
        dead, known = dead_F[idx].all(1), known_F[idx].all(1)
        zero = known & (value_F[idx] == 0).all(1)
        out.append(Probe(read, seg, idx, dead, known, value_F[idx[:, 0]], dead | (zero if padded else known)))
    return out


def _explain(cg: ChannelGraph, probes: list[Probe], removable: dict, blurs: dict[str, Blur],
             padded: dict[int, set], align: int) -> list[Kept]:
    """A reason for every zero filter and all-zero input channel that stays."""
    by_root: dict[int, list[Probe]] = {}
    for p in probes:
        by_root.setdefault(cg.find(p.seg.space), []).append(p)
    zero_filters = {}  # space -> (layer, (C,) bool) for every layer writing it
    for s in cg.sliced.values():
        if s.kind != "batchnorm":
            w = cg.gm.get_submodule(s.name).weight.detach()
            zero = (w.flatten(1) == 0).all(1).cpu()
            for seg in s.dst:
                zero_filters.setdefault(seg.space, []).append((s.name, s.kind, zero[seg.offset:seg.offset + seg.size]))

    groups = cg.groups()

    def why(space: int, k: int) -> tuple[str, str]:
        """(cause, detail): the cause is shared by many channels, the detail names this one's numbers."""
        root = cg.find(space)
        if cg.fixed.get(root):
            return cg.fixed[root][0], cg.fixed[root][0]
        if k in padded.get(root, ()):
            return (f"rounds its group's width up to a multiple of {align} (align)",
                    f"channel {k} could go; it is kept so that the group keeps a multiple of {align} channels")
        writers = [(n, z[k]) for s in groups[root] for n, kind, z in zero_filters.get(s, []) if kind != "depthwise"]
        live = [n for n, z in writers if not z]
        if len(writers) > 1 and len(live) < len(writers) and live:
            return ("coupled through a residual sum with a non-zero filter",
                    f"channel {k} is summed with the non-zero filter {k} of {', '.join(live)}")
        for p in by_root.get(root, []):
            if not p.ok[k]:
                if p.known[k]:
                    return (f"a non-zero constant reaches zero-padded {p.read.name}",
                            f"channel {k} is the constant {float(p.value[k]):.4g} where {p.read.name} reads it, "
                            f"and {p.read.name} pads with zeros (its border would change)")
                blur = [f"; zero-padded depthwise {n} turns the constant {float(b.value[g.offset + k]):.4g} into a "
                        "border pattern" for n, b in blurs.items() for g in cg.sliced[n].src
                        if cg.find(g.space) == root and bool(b.mask[g.offset + k])]
                return (f"not constant where {p.read.name} reads it",
                        f"channel {k} varies with the input where {p.read.name} reads it" + (blur[0] if blur else ""))
        return "last channel of its group", "a layer keeps at least one channel"

    kept = []
    for space, writers in zero_filters.items():
        gone = removable[cg.find(space)]
        for name, _, zero in writers:
            kept += [Kept(name, "filter", k, *why(space, k)) for k in (zero & ~gone).nonzero().flatten().tolist()]
    for p in probes:
        gone = removable[cg.find(p.seg.space)]
        kept += [Kept(p.read.name, "input", p.seg.offset // p.seg.inner + k, *why(p.seg.space, k))
                 for k in (p.dead & ~gone).nonzero().flatten().tolist()]
    return kept


def shrink(model: nn.Module, example_input: torch.Tensor, align: int = 1) -> tuple[nn.Module, ShrinkReport]:
    """A smaller copy of ``model`` (eval mode, a ``torch.fx.GraphModule`` of plain torch modules)
    without the channels nothing depends on, and the report of what went and what stayed.

    ``example_input`` fixes the spatial size the MACs are counted for and is the input the result
    is checked on; it must fit the model (batch first). The caller's model is not modified.
    ``align`` > 1 keeps enough removable channels (zero ones: still exact) that every group's width
    is a multiple of it, or its full width: CPU kernels (oneDNN's and onnxruntime's blocked NCHWc
    layouts work in blocks of 8 or 16 channels) and GPU tensor cores run such widths faster.
    """
    if not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be a positive integer, got {align!r}")
    gm = trace(model, example_input)
    cg = analyse(gm)
    consts, blurs = propagate(cg)
    decision = decide(cg, consts, blurs, align)
    before = measure(gm, example_input)
    with torch.no_grad():
        reference = gm(example_input)
    small = rebuild(cg, decision.keep, decision.folds)
    after = measure(small, example_input)
    with torch.no_grad():
        error = _max_abs(small(example_input), reference)
    scale = max(1.0, _max_abs(reference))
    if not error <= TOLERANCE * scale:  # an invariant of this module, not a user error
        raise RuntimeError(f"deploy: the shrunk {type(model).__name__} differs from the original by {error:.3g} "
                           f"(max abs) on the example input; this is a bug in elastictrain.deploy")
    return small, build_report(tuple(example_input.shape), before, after, decision.kept, error)


def _max_abs(a, b=None) -> float:
    """Largest |a - b| (or |a|) over the tensors of a model output (a tensor, or tuples / dicts of them)."""
    if isinstance(a, torch.Tensor):
        d = a if b is None else a - b
        return float(d.abs().max()) if d.numel() else 0.0
    if isinstance(a, dict):
        return max((_max_abs(a[k], None if b is None else b[k]) for k in a), default=0.0)
    if isinstance(a, (tuple, list)):
        return max((_max_abs(x, None if b is None else y) for x, y in zip(a, b if b is not None else a)), default=0.0)
    return 0.0
