"""Which examples each data-parallel rank visits in an epoch, the same rule for every loader.

Training: a permutation of all N examples drawn from (seed, epoch) alone, so every rank computes
the identical one without communicating; rank r takes ``perm[r::world_size]`` cut to
``N // world_size`` examples, so the shards are disjoint and every rank runs the same number of
steps (a rank that ran one step more would hang in its gradient all-reduce). At most
``world_size - 1`` examples sit out each epoch, different ones every epoch.

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


def shard_indices(n: int, *, seed: int, epoch: int, rank: int, world_size: int, train: bool) -> torch.Tensor:
    """The examples (int64, on the CPU) rank ``rank`` visits this epoch, in visiting order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if not train:
        return torch.arange(rank, n, world_size)
    g = torch.Generator().manual_seed(mix_seed(seed, epoch))
    perm = torch.randperm(n, generator=g)
    return perm[rank::world_size][: n // world_size]
