"""Which examples each data-parallel rank visits in an epoch, the same rule for every loader.

Training: a permutation of all N examples drawn from (seed, epoch) alone, so every rank computes
the identical one without communicating. Optimizer step s takes the next G = world_size ×
micro_batches × batch positions of it, interleaved over S = world_size × micro_batches shards:
shard k holds positions s·G + k, s·G + k + S, …; rank r runs shards r, r + W, r + 2W, … as its
micro-batches 0, 1, 2, … of the step. So the shards are disjoint, every rank runs the same number
of steps (a rank that ran one step more would hang in its gradient all-reduce), and — what lets a
stage change its world size mid-way — a step's micro-batches hold the same examples on any world
size with the same S (2 ranks × 1 micro-batch, or 1 process × 2: BatchNorm sees the same
batches). With micro_batches 1 and batch 1 this is ``perm[r::world_size]``. Fewer than G
examples sit out each epoch, different ones every epoch.

Evaluation: no shuffling and no cut: rank r takes ``r, r + world_size, ...``, so every test
example is counted exactly once once the per-rank sums are all-reduced. Shards may then differ by
one example (and so by at most one batch); reduce sums after the loop, not per batch.
"""
from __future__ import annotations

import numpy as np
import torch


def mix_seed(*words: int) -> int:
    """A 63-bit generator seed from several non-negative ints (seed, epoch, rank, stream)."""
    if any(w < 0 for w in words):
        raise ValueError(f"seed words must be >= 0 (got {words})")
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def step_positions(n: int, *, rank: int, world_size: int, batch: int = 1, micro_batches: int = 1) -> torch.Tensor:
    """The positions in the epoch's permutation that rank ``rank`` visits, in order: its
    ``micro_batches`` micro-batches of ``batch`` examples for each whole optimizer step."""
    shards = world_size * micro_batches
    steps = n // (shards * batch)
    grid = torch.arange(steps * shards * batch).view(steps, batch, shards)
    return grid[:, :, rank::world_size].permute(0, 2, 1).reshape(-1)  # (step, micro-batch, example)


def shard_indices(n: int, *, seed: int, epoch: int, rank: int, world_size: int, train: bool, batch: int = 1,
                  micro_batches: int = 1) -> torch.Tensor:
    """The examples (int64, on the CPU) rank ``rank`` visits this epoch, in visiting order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if not train:
        return torch.arange(rank, n, world_size)
    return permutation(n, seed, epoch)[step_positions(n, rank=rank, world_size=world_size, batch=batch,
                                                      micro_batches=micro_batches)]


def permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's order of all ``n`` examples, the same on every rank."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
