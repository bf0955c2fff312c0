"""What ``shrink`` did, layer by layer: shapes before → after, parameters, MACs, and the zero
filters and input channels that had to stay (with why), so "pruned but not smaller" is explained
rather than discovered. MACs are multiply-accumulates of convs and linear layers for one sample at
the example input's spatial size (BatchNorm and activations are not counted); parameters are the
whole model's. The ratios are realized ones (before / after), to set beside the nominal ones.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from elastictrain.deploy.graph import record_shapes, shape

LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class Kept:
    """A zero filter (``role="filter"``) or all-zero input channel (``role="input"``) that stays."""
    layer: str
    role: str
    channel: int
    cause: str   # shared by the channels kept for one reason (what the table counts)
    detail: str  # this channel's numbers


@dataclass
class LayerStat:
    kind: str
    shape: tuple[int, ...]   # weight shape (BatchNorm: (features,))
    params: int
    macs: int


@dataclass
class LayerReport:
    name: str
    kind: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    kept: list[Kept] = field(default_factory=list)  # zero filters / input channels that stay, and why


@dataclass
class ShrinkReport:
    input_shape: tuple[int, ...]
    layers: list[LayerReport]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    max_abs_error: float  # between the shrunk and the original model's outputs on the example input

    @property
    def param_ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    @property
    def mac_ratio(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    def layer(self, name: str) -> LayerReport:
        return next(l for l in self.layers if l.name == name)

    def to_dict(self) -> dict:
        """Plain ints, floats, strings and lists (JSON as it stands)."""
        out = asdict(self)
        out.update(param_ratio=self.param_ratio, mac_ratio=self.mac_ratio)
        return out

    def table(self) -> str:
        head = f"{'layer':<28}{'shape before → after':>34}{'params':>20}{'MACs':>24}"
        rows = [head, "-" * len(head)]
        for l in self.layers:
            shapes = f"{'×'.join(map(str, l.shape_before))} → {'×'.join(map(str, l.shape_after))}"
            rows.append(f"{l.name[:28]:<28}{shapes:>34}{f'{l.params_before} → {l.params_after}':>20}"
                        f"{f'{l.macs_before} → {l.macs_after}':>24}")
            for (role, cause), n in Counter((k.role, k.cause) for k in l.kept).items():
                rows.append(f"    {n} zero {'filters' if role == 'filter' else 'input channels'} kept: {cause}")
        rows.append("-" * len(head))
        rows.append(f"{'total':<28}{'':>34}{f'{self.params_before} → {self.params_after}':>20}"
                    f"{f'{self.macs_before} → {self.macs_after}':>24}")
        rows.append(f"realized: {self.param_ratio:.2f}× fewer parameters, {self.mac_ratio:.2f}× fewer MACs "
                    f"(input {'×'.join(map(str, self.input_shape[1:]))}); max |Δ output| {self.max_abs_error:.2g}")
        kept = Counter(k.role for l in self.layers for k in l.kept)
        if kept:
            rows.append(f"kept though zero (reasons above): {kept['filter']} filters, {kept['input']} input channels")
        return "\n".join(rows)


def measure(gm: fx.GraphModule, example_input: torch.Tensor) -> tuple[dict[str, LayerStat], int]:
    """Per conv / linear / BatchNorm module: its stats at ``example_input``; and the model's parameter count."""
    record_shapes(gm, example_input)
    stats: dict[str, LayerStat] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mod := gm.get_submodule(node.target), LAYERS):
            continue
        out = shape(node)
        per_sample = 1
        for d in out[1:-1] if isinstance(mod, nn.Linear) else out[2:]:
            per_sample *= d
        if isinstance(mod, nn.Conv2d):
            macs = per_sample * mod.out_channels * mod.weight[0].numel()
        elif isinstance(mod, nn.Linear):
            macs = per_sample * mod.weight.numel()
        else:
            macs = 0
        if node.target in stats:  # a module called twice costs twice
            stats[node.target].macs += macs
            continue
        kind = "batchnorm" if not isinstance(mod, (nn.Conv2d, nn.Linear)) else "linear" \
            if isinstance(mod, nn.Linear) else "depthwise" if mod.groups > 1 and mod.groups == mod.in_channels \
            else "conv"
        w = mod.weight if mod.weight is not None else mod.running_mean
        stats[node.target] = LayerStat(kind, tuple(w.shape), sum(p.numel() for p in mod.parameters(recurse=False)),
                                       macs)
    return stats, sum(p.numel() for p in gm.parameters())


def build_report(input_shape: tuple[int, ...], before: tuple, after: tuple, kept: list, error: float) -> ShrinkReport:
    (b, params_before), (a, params_after) = before, after
    layers = [LayerReport(n, s.kind, s.shape, a[n].shape, s.params, a[n].params, s.macs, a[n].macs,
                          [k for k in kept if k.layer == n]) for n, s in b.items()]
    return ShrinkReport(input_shape, layers, params_before, params_after, sum(s.macs for s in b.values()),
                        sum(s.macs for s in a.values()), error)
