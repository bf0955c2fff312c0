"""Peer pruning libraries for bench/peers.py (the same dense model, data, epochs and schedule as its
plain PyTorch row, pruned by another library's API instead of ``torch.nn.utils.prune``) and
bench/deploy.py (another library removing the same pruned channels as ``elastictrain.deploy``).

The peers are benchmark-only (bench/requirements.txt, ``make bench-setup``), not dependencies of the
package: each is imported inside its function, which exits with a one-line hint when it is missing.

- ``torchao_prune``: torchao's ``torchao.prototype.sparsity`` — ``WeightNormSparsifier`` with 1×1
  blocks (unstructured magnitude pruning) driven by its ``CubicSL`` scheduler (Zhu & Gupta's cubic
  ramp). This sparsifier is **per-layer**, not global: every conv and linear weight is pruned to the
  same sparsity 1 - 1/ratio, where the plain row and ElasticTrain rank all weights together.
  torchao 0.18's sparsifier only builds masks for 2-D weights (a conv's 4-D weight fails in
  ``_make_tensor_mask``), so conv weights are ranked through a norm that views them as
  (out, in·kh·kw) and masked by a parametrization that reshapes the mask back: the same 1×1 ranking.
- ``torch_pruning_remove``: Torch-Pruning's ``DependencyGraph`` physically removing given output
  channels (and everything its own dependency analysis couples to them) from a copy of a model.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import Tensor, nn

from elastictrain.train import evaluate


def torchao_prune(plain, ratio: float) -> dict:
    """Prune a copy of ``plain.model`` (bench/peers.py's ``Plain``) to 1/ratio of each conv and
    linear weight with torchao: masks updated every 50 steps along the cubic schedule to the target
    at 70% of the pruning steps (as ``Plain.prune``), then squashed into the weights."""
    try:
        from torchao.prototype.sparsity import CubicSL, FakeSparsity, WeightNormSparsifier
    except ImportError:
        raise SystemExit("torchao is missing: run `make bench-setup` (bench/requirements.txt)") from None

    class FlatSparsity(FakeSparsity):
        """torchao's mask parametrization for a mask the sparsifier built on the 2-D view of a weight."""

        def forward(self, x: Tensor) -> Tensor:
            return self.mask.reshape(x.shape) * x

    t0 = time.perf_counter()
    model = copy.deepcopy(plain.model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(m.weight.numel() for _, m in layers)
    sparsifier = WeightNormSparsifier(sparsity_level=1 - 1 / ratio, sparse_block_shape=(1, 1), zeros_per_block=1,
                                      norm=lambda w: w.abs().flatten(1))  # L1, as the plain row; 2-D view
    sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight", "parametrization": FlatSparsity}
                               for name, _ in layers])
    steps = plain.a.prune_epochs * len(plain.train)
    # t counts optimizer steps; CubicSL reaches the target at t = delta_t * total_t = 70% of them
    scheduler = CubicSL(sparsifier, init_sl=0.0, init_t=0, delta_t=50, total_t=0.7 * steps / 50)
    sparsifier.step()  # all-ones masks (level 0); torchao wants a sparsifier step before the scheduler's

    def on_step(step: int, total_steps: int) -> None:
        scheduler.step()  # sets each group's sparsity_level for t = step
        if step % 50 == 0 or step == int(0.7 * total_steps):
            sparsifier.step()

    plain.fit(model, plain.a.prune_epochs, 0.05, on_step)
    sparsifier.squash_mask()
    return {"dense_top1": plain.dense_top1, "top1": evaluate(model, plain.test)["top1"],
            "nonzeros": sum(int(m.weight.ne(0).sum()) for _, m in layers), "params": total,
            "seconds": plain.dense_seconds + time.perf_counter() - t0}


def torch_pruning_remove(model: nn.Module, example: Tensor, removals: list[tuple[str, list[int]]]) -> nn.Module:
    """A copy of ``model`` (eval mode) with Torch-Pruning's dependency graph removing, for each
    ``(layer, channels)`` in ``removals``, those output channels of that conv / linear layer and
    whatever its graph couples to them (BatchNorm entries, consumers' inputs, residual partners).
    Each entry is one coupled group, pruned with the group's channel indices (unchanged by the
    removals before it, which touch other groups)."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise SystemExit("torch-pruning is missing: run `make bench-setup` (bench/requirements.txt)") from None

    model = copy.deepcopy(model).eval()
    with torch.enable_grad():  # the graph is read off autograd's grad_fn chain
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    for name, idxs in removals:
        layer = model.get_submodule(name)
        fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
        group = dg.get_pruning_group(layer, fn, idxs=list(idxs))
        if not dg.check_pruning_group(group):
            raise RuntimeError(f"torch-pruning refuses to remove {len(idxs)} channels of {name}")
        group.prune()
    return model
