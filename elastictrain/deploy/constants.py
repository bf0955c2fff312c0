"""Which channels hold the same number at every position and for every input, and which number.

A channel whose filter is all zero outputs its bias everywhere; BatchNorm (eval), activations and
pooling turn that constant into another one; a residual sum of constants is a constant. Where such
a channel reaches a conv or linear layer its contribution does not depend on the input, so it can
be folded into that layer's bias and the channel removed — exactly, as long as every output
position sees the constant through the same weights (a zero-padded conv sees zeros at the border
instead, so there only a constant 0 is harmless). Constants are computed by running the model's
own modules on a 1×1 map of them, in the model's dtype, so they match its arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from elastictrain.deploy.graph import META, ChannelGraph, shape


@dataclass
class Const:
    """Per feature of a tensor's channel axis: ``known`` (F,) bool, ``value`` (F,) (0 where unknown)."""
    known: torch.Tensor
    value: torch.Tensor


@dataclass
class Blur:
    """Channels of a depthwise conv where a non-zero constant came in and a border pattern went out."""
    mask: torch.Tensor
    value: torch.Tensor


def zero_padded(conv: nn.Conv2d) -> bool:
    """Does the conv see zeros past the border (so a constant input is not constant at the output)?"""
    if conv.padding_mode != "zeros":
        return False  # reflect / replicate / circular padding of a constant is that constant
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def propagate(cg: ChannelGraph) -> tuple[dict[fx.Node, Const], dict[str, Blur]]:
    consts: dict[fx.Node, Const] = {}
    blurs: dict[str, Blur] = {}
    device = next(iter(cg.gm.parameters()), torch.empty(0)).device
    with torch.no_grad():
        for node in cg.layouts:  # insertion order is execution order
            kind = cg.kinds.get(node, "opaque")
            shp, dtype = shape(node), node.meta[META].dtype
            n_features = shp[1]
            unknown = Const(torch.zeros(n_features, dtype=torch.bool, device=device),
                            torch.zeros(n_features, dtype=dtype, device=device))
            if kind in ("source", "opaque"):
                consts[node] = unknown
            elif kind == "same":  # a reshape that changes nothing
                consts[node] = consts[node.args[0]]
            elif kind == "producer":
                consts[node] = _producer(cg.gm.get_submodule(node.target))
            elif kind == "depthwise":
                consts[node], blurs[node.target] = _depthwise(cg.gm.get_submodule(node.target),
                                                              consts[node.args[0]])
            elif kind in ("pool", "flatten"):
                c = consts[node.args[0]]
                known = c.known & (c.value == 0) if kind == "pool" and _lossy_pool(cg, node) else c.known
                value = torch.where(known, c.value, torch.zeros_like(c.value))
                hw = n_features // len(known)  # 1 for a pool, H·W for a flatten
                consts[node] = Const(known.repeat_interleave(hw), value.repeat_interleave(hw))
            elif kind == "cat":
                parts = [consts[p] for p in (node.args[0] if node.args else node.kwargs["tensors"])]
                consts[node] = Const(torch.cat([p.known for p in parts]), torch.cat([p.value for p in parts]))
            else:  # elementwise, batchnorm, add: run the op itself on the constants
                consts[node] = _execute(cg, node, consts, len(shp))
    return consts, blurs


def _producer(mod: nn.Module) -> Const:
    w = mod.weight.detach()
    zero = (w.flatten(1) == 0).all(1)
    bias = mod.bias.detach() if mod.bias is not None else torch.zeros_like(zero, dtype=w.dtype)
    return Const(zero, torch.where(zero, bias, torch.zeros_like(bias)))


def _depthwise(conv: nn.Conv2d, c: Const) -> tuple[Const, Blur]:
    w = conv.weight.detach()  # (C, 1, kh, kw)
    zero = (w.flatten(1) == 0).all(1)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(len(zero), dtype=w.dtype)
    padded = zero_padded(conv)
    passes = c.known & ((c.value == 0) | (not padded))
    value = torch.where(zero, bias, torch.where(passes, c.value * w.flatten(1).sum(1) + bias, torch.zeros_like(bias)))
    blurred = c.known & (c.value != 0) & padded & ~zero
    return Const(zero | passes, value), Blur(blurred, c.value.clone())


def _lossy_pool(cg: ChannelGraph, node: fx.Node) -> bool:
    """Average pooling with zero padding counted in, or a fixed divisor, does not keep constants."""
    if node.op == "call_module":
        mod = cg.gm.get_submodule(node.target)
        if not isinstance(mod, nn.AvgPool2d):
            return False
        padding, include, divisor = mod.padding, mod.count_include_pad, mod.divisor_override
    elif node.target is F.avg_pool2d:
        names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
        args = {**dict(zip(names, node.args)), **node.kwargs}
        padding, include, divisor = args.get("padding", 0), args.get("count_include_pad", True), \
            args.get("divisor_override")
    else:
        return False
    padded = any(p > 0 for p in padding) if isinstance(padding, (tuple, list)) else padding > 0
    return (padded and include) or divisor is not None


def _execute(cg: ChannelGraph, node: fx.Node, consts: dict[fx.Node, Const], rank: int) -> Const:
    """Run ``node`` on (1, F[, 1, 1]) tensors of its inputs' constants: a channel stays known when
    all its inputs are known (BatchNorm with a zero scale makes its bias known whatever comes in)."""
    def as_map(n: fx.Node) -> torch.Tensor:
        v = consts[n].value.clone()  # in-place ops (ReLU(inplace=True)) must not touch the table
        return v.view(1, -1, 1, 1) if rank == 4 else v.view(1, -1)

    args = fx.node.map_arg(node.args, as_map)
    kwargs = fx.node.map_arg(node.kwargs, as_map)
    if node.op == "call_module":
        out = cg.gm.get_submodule(node.target)(*args, **kwargs)
    elif node.op == "call_function":
        out = node.target(*args, **kwargs)
    else:
        out = getattr(args[0], node.target)(*args[1:], **kwargs)
    value = out.reshape(-1).to(consts[node.all_input_nodes[0]].value.dtype)
    known = torch.stack([consts[n].known for n in node.all_input_nodes if n in consts]).all(0)
    if cg.kinds[node] == "batchnorm":
        bn = cg.gm.get_submodule(node.target)
        if bn.affine:
            scale0 = bn.weight.detach() == 0
            known = known | scale0
            value = torch.where(scale0, bn.bias.detach(), value)
    known = known & torch.isfinite(value)
    return Const(known, torch.where(known, value, torch.zeros_like(value)))
