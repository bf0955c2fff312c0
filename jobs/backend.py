"""A stage's backend on one rank of a DeepSpeed data-parallel group (``elastictrain.train.Backend``).

The process group exists already (Ray Train, ``torchrun`` or a test made it). What each rank does
that one process does not, in the order a stage meets it:
- ``engine``: a DeepSpeed engine (ZeRO 0–3) and its stepper (``jobs.deepspeed_engine``);
- ``after_update``: after every constraint update, DeepSpeed's master weights and optimizer
  moments of newly pruned entries are zeroed, then every rank checks that it holds bit-identical
  masks, pattern libraries and codebooks (an all-gathered fingerprint, 8 bytes a layer);
- ``reduce_metrics`` / ``all_finite`` / ``barrier``: one small collective each;
- ``state_dict``: under ZeRO-3 the partitioned parameters are gathered (a collective);
- ``optimizer_state``: None — ZeRO partitions it, and one rank's slice restores nothing.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from elastictrain.distributed import check_identical
from jobs.cluster import DeepSpeedConfig
from jobs.deepspeed_engine import autocast_dtype, gathered_state_dict, initialize, remask_master


class DeepSpeedBackend:
    def __init__(self, ds: DeepSpeedConfig, rank: int, world_size: int, device: torch.device, accumulation: int = 1,
                 nominal_world: Optional[int] = None):
        self.ds, self.rank, self.world_size, self.device = ds, rank, world_size, device
        self.accumulation, self.nominal_world = accumulation, nominal_world or world_size
        self.autocast = autocast_dtype(ds, device)
        self.transport = None  # the engine's shared-memory all-reduce, when it has one

    def engine(self, model, opt, sched, constrainer, *, batch_per_rank: int, clip: Optional[float],
               accumulation: Optional[int] = None):
        engine, stepper = initialize(self.ds, model, opt, sched, constrainer, batch_per_rank, self.world_size, clip,
                                     accumulation or self.accumulation)
        self.transport = stepper.transport
        return engine, stepper

    def after_update(self, constrainer, event: str) -> None:
        if event == "masks":
            remask_master(constrainer, self.ds.zero_stage)
        check_ranks(constrainer)

    def reduce_metrics(self, m: dict) -> dict:
        return reduce_metrics(m)

    def all_finite(self, x: float) -> bool:
        return all_finite(x, self.transport)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def state_dict(self, model) -> dict:
        if self.ds.zero_stage == 3:
            return gathered_state_dict(model)
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def optimizer_state(self, opt) -> Optional[dict]:
        return None


def check_ranks(constrainer) -> None:
    """Masks, libraries and codebooks must be bit-identical on every rank (an all-gathered
    fingerprint, a few bytes per layer); a mismatch stops the run naming the layer and ranks."""
    check_identical(constrainer.masks, "masks")
    check_identical(constrainer.libraries, "pattern libraries")
    check_identical(constrainer.codebooks, "codebooks")


def all_finite(x: float, transport=None) -> bool:
    """``x`` is finite on every rank (one float all-reduced — through shared memory where the
    gradients go that way, since it runs every step): ranks stop together or not at all."""
    t = torch.tensor([0.0 if math.isfinite(x) else 1.0])
    if transport is not None:
        transport(t)
    else:
        dist.all_reduce(t)
    return float(t[0]) == 0.0


def reduce_metrics(m: dict) -> dict:
    """Per-rank metrics → global: test metrics weighted by each rank's test images, training
    loss/accuracy averaged (equal shards), throughput summed."""
    if not dist.is_initialized():
        return m
    m = dict(m)
    if "test_images" in m:
        n = m["test_images"]
        t = torch.tensor([m["top1"] * n, m["top5"] * n, m["test_loss"] * n, n], dtype=torch.float64)
        dist.all_reduce(t)
        m.update(top1=float(t[0] / t[3]), top5=float(t[1] / t[3]), test_loss=float(t[2] / t[3]), test_images=int(t[3]))
    if "robust_images" in m:  # robust accuracies, weighted by each rank's attacked images
        keys = sorted(k for k in m if k.startswith("robust:"))
        n = m["robust_images"]
        t = torch.tensor([m[k] * n for k in keys] + [n], dtype=torch.float64)
        dist.all_reduce(t)
        m.update({k: float(t[i] / max(float(t[-1]), 1)) for i, k in enumerate(keys)}, robust_images=int(t[-1]))
    if "loss" in m:
        w = dist.get_world_size()
        t = torch.tensor([m["loss"], m["train_acc"], m["images_per_s"]], dtype=torch.float64)
        dist.all_reduce(t)
        m.update(loss=float(t[0] / w), train_acc=float(t[1] / w), images_per_s=float(t[2]))
    return m
