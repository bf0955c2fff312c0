"""Which channels of a model move together: the dependency analysis behind ``shrink``.

An output channel of a conv can only go if every tensor that carries it loses it, and those tensors
are found on the real graph (``torch.fx``), not in module order: a residual ``add`` forces its
operands to keep the same channels, a ``cat`` shifts them, a flatten spreads each over H·W linear
inputs, a depthwise conv passes channel i straight through. So every conv / linear output opens a
*space* of channels; the ops above lay spaces out along a tensor's channel axis (a *layout* of
segments) or tie spaces together (union-find: one *group* per set of tied spaces); an op this file
does not understand, the model input and the model output *fix* the spaces they touch — nothing
there is removed. Channels are the features of axis 1 of a 2-D or 4-D tensor.
"""
from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn


class UntraceableModel(ValueError):
    """The model cannot be turned into a graph by ``torch.fx.symbolic_trace``."""


@dataclass(frozen=True)
class Segment:
    """Channels ``0..size-1`` of ``space`` sit at features ``offset + k*inner + (0..inner-1)`` of a
    tensor's channel axis (``inner`` = H·W once a 4-D map is flattened for a linear layer)."""
    space: int
    offset: int
    size: int
    inner: int = 1


Layout = tuple[Segment, ...]


@dataclass(frozen=True)
class Sliced:
    """A module whose parameters index channels: ``conv`` / ``linear`` (groups = 1: reads ``src``,
    opens ``dst``), ``depthwise`` (channel i in → channel i out: ``src == dst``), ``batchnorm``."""
    name: str
    kind: str
    node: fx.Node
    src: Layout
    dst: Layout


ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                       nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
                       nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
ELEMENTWISE_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu,
                         F.silu, F.mish, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, torch.sigmoid,
                         torch.tanh, F.dropout, F.dropout1d, F.dropout2d, operator.mul, operator.truediv, torch.mul,
                         operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "mul", "mul_", "div", "div_",
                       "add", "add_", "sub", "sub_"}
POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_"}
SUB_TARGETS = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
RESHAPE_TARGETS = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
CAT_TARGETS = {torch.cat, torch.concat, torch.concatenate}
META = "deploy_tensor"  # node.meta key of a TensorInfo


def trace(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """An eval-mode copy of ``model`` as a GraphModule whose nodes carry shapes for ``example_input``."""
    name = type(model).__name__
    model = copy.deepcopy(model).eval()  # the caller's model is never touched
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ... — all mean the same
        raise UntraceableModel(f"deploy: model {name} cannot be traced with torch.fx ({_first_line(e)}); "
                               "data-dependent Python control flow must become static for deployment") from e
    try:
        record_shapes(gm, example_input)
    except _NodeFailed as e:
        raise ValueError(f"deploy: an input of shape {tuple(example_input.shape)} does not fit model {name} "
                         f"(at {e.node.target}: {_first_line(e.__cause__)})") from e.__cause__
    return gm


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class _NodeFailed(Exception):
    def __init__(self, node: fx.Node):
        super().__init__(node.name)
        self.node = node


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once, writing each tensor node's shape and dtype into ``node.meta``."""

    def run_node(self, n: fx.Node):
        try:
            out = super().run_node(n)
        except Exception as e:
            raise _NodeFailed(n) from e
        if isinstance(out, torch.Tensor):
            n.meta[META] = TensorInfo(tuple(out.shape), out.dtype)
        else:
            n.meta.pop(META, None)
        return out


def record_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    with torch.no_grad():
        _ShapeRecorder(gm).run(example_input)


def shape(node) -> Optional[tuple[int, ...]]:
    info = node.meta.get(META) if isinstance(node, fx.Node) else None
    return info.shape if info is not None else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class ChannelGraph:
    """Layouts of a traced model's tensors, the spaces tied into groups, and what reads them.

    ``sliced``: the modules to cut, with what they read and write; ``reads()``: the conv / linear
    ones among them (where a removed channel's value must be absorbed); ``fixed[root]``: why a group
    keeps every channel. ``kinds[node]`` says how ``constants.propagate`` should treat each node.
    """
    gm: fx.GraphModule
    layouts: dict[fx.Node, Layout] = field(default_factory=dict)
    kinds: dict[fx.Node, str] = field(default_factory=dict)
    sliced: dict[str, Sliced] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    fixed: dict[int, list[str]] = field(default_factory=dict)

    def new_space(self, size: int, fixed: Optional[str] = None) -> Layout:
        self.sizes.append(size)
        self.parent.append(len(self.parent))
        if fixed:
            self.fixed[self.parent[-1]] = [fixed]
        return (Segment(self.parent[-1], 0, size),)

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        assert self.sizes[a] == self.sizes[b], "only spaces of one size are tied"
        if a != b:
            self.parent[b] = a
            self.fixed[a] = self.fixed.get(a, []) + self.fixed.pop(b, [])

    def fix(self, layout: Optional[Layout], why: str) -> None:
        for seg in layout or ():
            self.fixed.setdefault(self.find(seg.space), []).append(why)

    def is_fixed(self, space: int) -> bool:
        return bool(self.fixed.get(self.find(space)))

    def groups(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for s in range(len(self.parent)):
            out.setdefault(self.find(s), []).append(s)
        return out

    def reads(self) -> list[Sliced]:
        return [s for s in self.sliced.values() if s.kind in ("conv", "linear")]

    def channel_groups(self) -> list[ChannelGroup]:
        """The groups that hold a sliceable layer, in order of their first space."""
        out = {r: ChannelGroup(self.sizes[r], [], [], [], list(dict.fromkeys(self.fixed.get(r, []))))
               for r in sorted(self.groups())}
        for s in self.sliced.values():
            for seg in s.dst if s.kind in ("conv", "linear") else ():
                out[self.find(seg.space)].writes.append((s.name, seg.offset))
            for seg in s.src:
                g = out[self.find(seg.space)]
                if s.kind in ("conv", "linear"):
                    g.reads.append((s.name, seg.offset, seg.inner))
                else:
                    g.passes.append((s.name, seg.offset))
        return [g for g in out.values() if g.writes or g.reads or g.passes]


@dataclass
class ChannelGroup:
    """Channels that can only go together: channel k is output channel ``offset + k`` of each
    ``writes`` layer, input features ``offset + k·inner .. + inner - 1`` of each ``reads`` layer and
    entry ``offset + k`` of each ``passes`` layer (BatchNorm, depthwise conv); ``fixed`` says why
    none of them can go (empty when they can)."""
    size: int
    writes: list[tuple[str, int]]
    reads: list[tuple[str, int, int]]
    passes: list[tuple[str, int]]
    fixed: list[str]


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """The coupled channel groups of ``model`` (what a coupled pruning spec must prune as one)."""
    return analyse(trace(model, example_input)).channel_groups()


def features(layout: Layout, keep: dict[int, torch.Tensor]) -> torch.Tensor:
    """The features of a tensor's channel axis that stay, given the kept channels of each group."""
    parts = [seg.offset + (keep[seg.space][:, None] * seg.inner + torch.arange(seg.inner)).flatten()
             for seg in layout]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target} (node {node.name})"


def analyse(gm: fx.GraphModule) -> ChannelGraph:
    """Walk the graph once, in execution order, giving each tensor node its layout."""
    cg = ChannelGraph(gm)
    uses = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in gm.graph.nodes:
        out = _visit(cg, node, uses)
        if out is not None:
            cg.layouts[node] = out
    return cg


def _flat_size(shp: tuple[int, ...]) -> int:
    n = 1
    for d in shp[1:]:
        n *= d
    return n


def _visit(cg: ChannelGraph, node: fx.Node, uses: Counter) -> Optional[Layout]:
    out_shape = shape(node)
    if node.op == "placeholder":
        cg.kinds[node] = "source"
        return cg.new_space(out_shape[1], "model input") if _channelled(out_shape) else None
    if node.op == "output":
        for n in node.all_input_nodes:
            cg.fix(cg.layouts.get(n), "reaches the model output")
        return None
    tensors = [n for n in node.all_input_nodes if shape(n) is not None]
    first = node.args[0] if node.args else None
    src = cg.layouts.get(first) if isinstance(first, fx.Node) else None
    only_first = tensors == [first] and src is not None and not node.kwargs.get("out")
    target = node.target
    if node.op == "call_module":
        mod = cg.gm.get_submodule(target)
        once = uses[target] == 1
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and once and only_first and len(node.args) == 1:
            if isinstance(mod, nn.Linear) and len(shape(first)) != 2:
                return _opaque(cg, node, out_shape)
            if isinstance(mod, nn.Linear) or mod.groups == 1:
                dst = cg.new_space(out_shape[1])
                cg.sliced[target] = Sliced(target, "linear" if isinstance(mod, nn.Linear) else "conv", node, src, dst)
                cg.kinds[node] = "producer"
                return dst
            if mod.groups == mod.in_channels == mod.out_channels:
                cg.sliced[target] = Sliced(target, "depthwise", node, src, src)
                cg.kinds[node] = "depthwise"
                return src
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and once and only_first and mod.track_running_stats:
            cg.sliced[target] = Sliced(target, "batchnorm", node, src, src)
            cg.kinds[node] = "batchnorm"
            return src
        elif isinstance(mod, ELEMENTWISE_MODULES) and only_first and shape(first) == out_shape:
            cg.kinds[node] = "elementwise"
            return src
        elif isinstance(mod, POOL_MODULES) and only_first and _pooled(shape(first), out_shape):
            cg.kinds[node] = "pool"
            return src
        elif isinstance(mod, nn.Flatten) and only_first:
            return _reshape(cg, node, src, shape(first), out_shape)
        return _opaque(cg, node, out_shape)
    if node.op in ("call_function", "call_method"):
        if tensors == [first] and _batch_size_only(node):
            return None
        if target in ADD_TARGETS | SUB_TARGETS and len(tensors) == 2 and tensors == list(node.args[:2]):
            return _couple(cg, node, out_shape)
        constant_args = not any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values()))
        if only_first and constant_args and shape(first) == out_shape and (
                target in ELEMENTWISE_FUNCTIONS or target in ELEMENTWISE_METHODS):
            cg.kinds[node] = "elementwise"
            return src
        if only_first and constant_args and target in POOL_FUNCTIONS and _pooled(shape(first), out_shape):
            cg.kinds[node] = "pool"
            return src
        if only_first and target in RESHAPE_TARGETS:
            return _reshape(cg, node, src, shape(first), out_shape)
        if target in CAT_TARGETS:
            return _cat(cg, node, out_shape)
    return _opaque(cg, node, out_shape)


def _batch_size_only(node: fx.Node) -> bool:
    """``x.size(0)``, or ``x.size()`` / ``x.shape`` read only at index 0: the batch size, whatever the channels."""
    if node.target == "size" and node.args[1:] == (0,) and not node.kwargs:
        return True
    whole = (node.target == "size" and len(node.args) == 1 and not node.kwargs) or (
        node.target is getattr and node.args[1:] == ("shape",))
    return whole and all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0
                         for u in node.users)


def _channelled(shp: Optional[tuple[int, ...]]) -> bool:
    return shp is not None and len(shp) in (2, 4)


def _pooled(in_shape, out_shape) -> bool:
    return out_shape is not None and len(in_shape) == len(out_shape) == 4 and in_shape[:2] == out_shape[:2]


def _opaque(cg: ChannelGraph, node: fx.Node, out_shape) -> Optional[Layout]:
    """An op this analysis does not model: what it reads keeps every channel, what it makes is fixed."""
    why = f"read by {describe(node)}, which deploy cannot slice"
    for n in node.all_input_nodes:
        cg.fix(cg.layouts.get(n), why)
    cg.kinds[node] = "opaque"
    return cg.new_space(out_shape[1], f"made by {describe(node)}") if _channelled(out_shape) else None


def _reshape(cg: ChannelGraph, node: fx.Node, src: Layout, in_shape, out_shape) -> Optional[Layout]:
    """(N, C, H, W) → (N, C·H·W) keeps channel c at features c·H·W .. c·H·W + H·W - 1; anything
    else (a reshape that mixes channels or keeps the rank) is opaque unless it changes nothing."""
    if in_shape == out_shape:
        cg.kinds[node] = "same"
        return src
    if len(in_shape) == 4 and out_shape is not None and out_shape == (in_shape[0], _flat_size(in_shape)):
        hw = in_shape[2] * in_shape[3]
        cg.kinds[node] = "flatten"
        return tuple(Segment(s.space, s.offset * hw, s.size, s.inner * hw) for s in src)
    return _opaque(cg, node, out_shape)


def _couple(cg: ChannelGraph, node: fx.Node, out_shape) -> Optional[Layout]:
    """``a + b`` / ``a - b``: the channels at one position of both operands become one."""
    a, b = node.args[:2]
    la, lb = cg.layouts.get(a), cg.layouts.get(b)
    aligned = (la is not None and lb is not None and shape(a) == shape(b) == out_shape and len(la) == len(lb)
               and all((x.offset, x.size, x.inner) == (y.offset, y.size, y.inner) for x, y in zip(la, lb)))
    if not aligned:
        return _opaque(cg, node, out_shape)
    for x, y in zip(la, lb):
        cg.union(x.space, y.space)
    cg.kinds[node] = "add"
    return la


def _cat(cg: ChannelGraph, node: fx.Node, out_shape) -> Optional[Layout]:
    """``torch.cat([...], dim=1)``: each operand's segments, shifted by the features before it."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not _channelled(out_shape) or not isinstance(parts, (list, tuple)) or dim not in (1, 1 - len(out_shape)):
        return _opaque(cg, node, out_shape)
    layouts = [cg.layouts.get(p) if isinstance(p, fx.Node) else None for p in parts]
    if any(lay is None for lay in layouts) or len(node.all_input_nodes) != len(parts):
        return _opaque(cg, node, out_shape)
    out, offset = [], 0
    for p, lay in zip(parts, layouts):
        out += [Segment(s.space, s.offset + offset, s.size, s.inner) for s in lay]
        offset += shape(p)[1]
    cg.kinds[node] = "cat"
    return tuple(out)
