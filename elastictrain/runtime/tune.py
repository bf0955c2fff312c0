"""Per-layer autotune: time every implementation of each conv / linear / pool on that layer's real input
(captured from one forward of the example batch) and keep the fastest that computes the same
output. Dense is always a candidate, so no layer of a tuned model is slower than dense as measured.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from elastictrain.runtime.layers import candidates

TOLERANCE = 1e-4  # max |Δ| of a candidate's output vs dense, relative to max(1, largest |output|)
# a candidate whose first call takes HOPELESS × dense's median, and over HOPELESS_MS, is not timed
# further (its ms is that call's): a cold first call of a small layer may be slow and still win
HOPELESS, HOPELESS_MS = 3.0, 5.0


@dataclass
class LayerChoice:
    name: str
    impl: str
    ms: dict[str, float]                 # median ms of each candidate on this layer's input (one call if hopeless)
    weights: int                         # weights of the dense layer (0 for a pool)
    nonzeros: int
    rejected: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not timed

    @property
    def speedup(self) -> float:
        return self.ms["dense"] / self.ms[self.impl]


@dataclass
class Tuning:
    batch: int
    threads: int
    layers: list[LayerChoice]

    def choices(self) -> dict[str, str]:
        return {c.name: c.impl for c in self.layers}

    def to_dict(self) -> dict:
        return {"batch": self.batch, "threads": self.threads, "layers": [asdict(c) for c in self.layers]}


TUNED = (nn.Conv2d, nn.Linear, nn.MaxPool2d)


def layer_inputs(model: nn.Module, example: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every conv / linear / max-pool module on ``example`` (one forward, hooks)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].detach())) for n, m in
             model.named_modules() if type(m) in TUNED]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _median_ms(fn, x, warmup: int, runs: int) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)  # a GPU call returns before it is done
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def autotune(model: nn.Module, example: torch.Tensor, warmup: int = 2, runs: int = 7) -> Tuning:
    """The fastest exact implementation of each conv / linear layer of ``model`` on ``example``."""
    layers = []
    with torch.inference_mode():
        for name, x in layer_inputs(model, example).items():
            dense = model.get_submodule(name)
            w = dense.weight.detach() if hasattr(dense, "weight") else torch.zeros(0)
            ref = dense(x)
            scale = max(1.0, float(ref.abs().max()))
            ms, rejected = {}, {}
            for impl, m in candidates(dense).items():
                t0 = time.perf_counter()
                try:
                    out = m(x)
                    err = float((out - ref).abs().max())  # (.max() waits for a GPU result)
                except RuntimeError as e:
                    rejected[impl] = f"failed: {str(e).splitlines()[0][:120]}"
                    continue
                first = 1000 * (time.perf_counter() - t0)
                if not err <= TOLERANCE * scale:
                    rejected[impl] = f"inexact: max |Δ| {err:.3g}"
                    continue
                if impl != "dense" and first > max(HOPELESS * ms["dense"], HOPELESS_MS):  # not worth timing
                    ms[impl] = first
                    continue
                ms[impl] = _median_ms(m, x, warmup, runs)
            layers.append(LayerChoice(name, min(ms, key=ms.get), ms, w.numel(), int((w != 0).sum()), rejected))
    return Tuning(int(example.shape[0]), torch.get_num_threads(), layers)


def tuned(model: nn.Module, example: torch.Tensor, batch: int) -> tuple[nn.Module, Tuning]:
    """A copy of ``model`` with each layer's fastest exact implementation here, tuned on a random
    batch of ``batch`` inputs shaped like ``example``'s, and the tuning."""
    import copy

    xb = torch.randn(batch, *example.shape[1:], generator=torch.Generator().manual_seed(1)).to(example.device)
    tuning = autotune(model, xb)
    return apply(copy.deepcopy(model), tuning.choices()).eval(), tuning


def apply(model: nn.Module, choices: dict[str, str]) -> nn.Module:
    """``model`` with each named layer replaced by its chosen implementation (in place; returned)."""
    for name, impl in choices.items():
        if impl == "dense":
            continue
        dense = model.get_submodule(name)
        options = candidates(dense)
        if impl not in options:
            raise ValueError(f"runtime: layer {name} has no implementation {impl!r} here "
                             f"(available: {', '.join(options)})")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, options[impl])
    return model
