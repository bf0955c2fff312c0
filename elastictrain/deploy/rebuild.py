"""The smaller model itself: each module that indexes channels swapped for a sliced copy.

The traced graph is kept node for node — only the modules behind it change — so any topology the
analysis understood survives, and the result is a ``torch.fx.GraphModule`` of plain ``torch.nn``
layers that loads and runs without ElasticTrain. The constant a removed channel contributed (see
``constants``) is added to the reading layer's bias; a layer without a bias whose only user is a
BatchNorm takes it in that BatchNorm's running mean instead (BN(y + d) with mean m is BN(y) with
mean m - d), so no parameter is added; otherwise the layer gains a bias.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import fx, nn
from torch.nn.utils import skip_init

from elastictrain.deploy.graph import ChannelGraph, Sliced, features


def rebuild(cg: ChannelGraph, keep: dict[int, torch.Tensor], folds: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Slice ``cg.gm``'s modules in place (it is ``shrink``'s private copy) and return it."""
    gm = cg.gm
    by_space = {s: keep[cg.find(s)] for s in range(len(cg.parent))}
    bias_shift: dict[str, torch.Tensor] = {}
    mean_shift: dict[str, torch.Tensor] = {}
    for name, delta in folds.items():
        bn = _sole_batchnorm(cg, cg.sliced[name].node)
        if gm.get_submodule(name).bias is None and bn is not None:
            mean_shift[bn] = delta
        else:
            bias_shift[name] = delta
    with torch.no_grad():
        for name, s in cg.sliced.items():
            src, dst = features(s.src, by_space), features(s.dst, by_space)
            if len(src) == _width(s.src) and len(dst) == _width(s.dst) and name not in bias_shift | mean_shift:
                continue
            old = gm.get_submodule(name)
            new = _slice(old, s, src, dst, bias_shift.get(name), mean_shift.get(name))
            new.train(old.training)
            parent, _, attr = name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, new)
    return gm


def _width(layout) -> int:
    return sum(seg.size * seg.inner for seg in layout)


def _sole_batchnorm(cg: ChannelGraph, node: fx.Node) -> Optional[str]:
    users = list(node.users)
    if len(users) == 1 and cg.kinds.get(users[0]) == "batchnorm":
        return users[0].target
    return None


def _slice(old: nn.Module, s: Sliced, src: torch.Tensor, dst: torch.Tensor, bias_shift: Optional[torch.Tensor],
           mean_shift: Optional[torch.Tensor]) -> nn.Module:
    """A new module of ``old``'s type holding its entries at input features ``src`` and output
    channels ``dst`` (one index for depthwise convs and BatchNorm, whose ``src`` is ``dst``)."""
    if s.kind == "batchnorm":
        new = skip_init(type(old), len(dst), eps=old.eps, momentum=old.momentum, affine=old.affine,
                        track_running_stats=old.track_running_stats, device=old.running_mean.device,
                        dtype=old.running_mean.dtype)
        mean = old.running_mean - mean_shift if mean_shift is not None else old.running_mean
        new.running_mean.copy_(mean[dst])
        new.running_var.copy_(old.running_var[dst])
        new.num_batches_tracked.copy_(old.num_batches_tracked)
        if old.affine:
            new.weight.copy_(old.weight[dst])
            new.bias.copy_(old.bias[dst])
        return new
    w = old.weight
    has_bias = old.bias is not None or bias_shift is not None
    bias = old.bias if old.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if bias_shift is not None:
        bias = bias + bias_shift
    if s.kind == "linear":
        new = skip_init(nn.Linear, len(src), len(dst), bias=has_bias, device=w.device, dtype=w.dtype)
        new.weight.copy_(w[dst][:, src])
    else:
        depthwise = s.kind == "depthwise"
        new = skip_init(nn.Conv2d, len(src), len(dst), old.kernel_size, stride=old.stride, padding=old.padding,
                        dilation=old.dilation, groups=len(dst) if depthwise else 1, bias=has_bias,
                        padding_mode=old.padding_mode, device=w.device, dtype=w.dtype)
        new.weight.copy_(w[dst] if depthwise else w[dst][:, src])
    if has_bias:
        new.bias.copy_(bias[dst])
    return new
