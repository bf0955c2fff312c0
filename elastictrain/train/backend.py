"""What differs between one process and one rank of a data-parallel group, as one interface.

A training stage is written once against ``Backend``: it asks the backend for the engine that
runs forward and the optimizer step, tells it after every constraint update (so a distributed
backend can re-mask optimizer partitions and check that every rank holds the same state), and asks
it to reduce metrics, agree on faults, wait for every rank and gather the whole model. ``Local`` is
the single-process backend; ``jobs.deepspeed_engine.DeepSpeedBackend`` is a DeepSpeed rank.
"""
from __future__ import annotations

import math
from typing import Optional, Protocol

import torch
from torch import nn

from elastictrain.train.loop import TorchStepper


class StageFailed(RuntimeError):
    """A stage stopped by a fault it cannot train through (NaN/Inf); the message is one line
    naming the stage, the fault and the last good resume point. Every rank raises it together
    (``Backend.all_finite``), so a launcher reports it once and never retries it."""


class Backend(Protocol):
    rank: int
    world_size: int
    device: torch.device
    autocast: Optional[torch.dtype]
    """the autocast compute dtype (bf16 on GPUs), or None for plain fp32."""
    accumulation: int
    """micro-batches whose gradients make one optimizer step at the nominal world size (the
    constrainer, the LR schedule, gradient reduction and step metrics all count optimizer steps)."""
    nominal_world: int
    """the world size the cluster asks for; an elastic group may run with fewer ranks, and then
    accumulates more micro-batches per step (``step_split``)."""

    def engine(self, model: nn.Module, opt: torch.optim.Optimizer, sched, constrainer, *,
               batch_per_rank: int, clip: Optional[float],
               accumulation: Optional[int] = None) -> tuple[nn.Module, object]:
        """(what forward calls, the stepper owning backward / step / save / load); ``accumulation``
        overrides the backend's (``step_split`` on a smaller elastic group)."""

    def after_update(self, constrainer, event: str) -> None:
        """Called after every constraint update ("masks", "codebooks", "admm") on every rank."""

    def reduce_metrics(self, m: dict) -> dict:
        """Per-rank metrics → the group's (identity on one process)."""

    def all_finite(self, x: float) -> bool:
        """Whether ``x`` is finite on *every* rank (so all ranks stop together, never one alone)."""

    def barrier(self) -> None:
        """Wait for every rank (resume points are committed after all ranks wrote theirs)."""

    def state_dict(self, model: nn.Module) -> dict:
        """The whole model's state on CPU (a collective under ZeRO-3, which gathers partitions)."""

    def optimizer_state(self, opt: torch.optim.Optimizer) -> Optional[dict]:
        """What a finished checkpoint keeps of the optimizer (None where it is partitioned)."""


def step_split(batch_size: int, accumulation: int, nominal_world: int, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, micro-batches per optimizer step) on ``world_size`` ranks, keeping
    every optimizer step at ``batch_size × accumulation`` examples — the same examples whatever the
    world size, since each global micro-batch is the next run of one shared permutation
    (``data.shard``). At the nominal world size it is the configured split; a smaller (elastic)
    group keeps the per-rank micro-batch and accumulates more where that divides, else takes the
    smallest accumulation that splits the step's examples equally."""
    if world_size == nominal_world:
        return batch_size // world_size, accumulation
    step = batch_size * accumulation
    if step % world_size:
        raise ValueError(f"{world_size} ranks cannot share an optimizer step of {step} examples equally")
    micro = max(1, batch_size // nominal_world)
    a = max(1, -(-step // (world_size * micro)))
    while step % (world_size * a):
        a += 1
    return step // (world_size * a), a


class Local:
    """One process: the model itself, a ``TorchStepper``, nothing to reduce or wait for."""

    rank, world_size, nominal_world = 0, 1, 1

    def __init__(self, device: torch.device = torch.device("cpu"), autocast: Optional[torch.dtype] = None,
                 accumulation: int = 1):
        self.device, self.autocast, self.accumulation = device, autocast, accumulation

    def engine(self, model, opt, sched, constrainer, *, batch_per_rank: int, clip: Optional[float],
               accumulation: Optional[int] = None):
        return model, TorchStepper(model, opt, sched, clip, accumulation or self.accumulation)

    def after_update(self, constrainer, event: str) -> None:
        pass  # the constrainer already masked the torch optimizer's state itself

    def reduce_metrics(self, m: dict) -> dict:
        return m

    def all_finite(self, x: float) -> bool:
        return math.isfinite(x)

    def barrier(self) -> None:
        pass

    def state_dict(self, model: nn.Module) -> dict:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def optimizer_state(self, opt: torch.optim.Optimizer) -> Optional[dict]:
        return opt.state_dict()
