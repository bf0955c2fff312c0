"""The few collectives this package uses, reading as world size 1 when torch.distributed is off.

Every wrapper is a no-op (or the trivial result) at world size 1, so the callers need no branch
for a single process and a test can run them without a process group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group=None) -> int:
    """This process's rank *in the group* (collectives order their results by it)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def all_gather(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``t`` stacked in group-rank order: (W, *t.shape). Shapes must match on all ranks."""
    t = t.contiguous()
    W = world_size(group)
    if W == 1:
        return t[None].clone()
    out = [torch.empty_like(t) for _ in range(W)]
    dist.all_gather(out, t, group=group)
    return torch.stack(out)


def all_reduce_(t: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """In-place all_reduce (SUM by default); ``t`` itself at world size 1."""
    if world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t


def broadcast_(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast from global rank ``src`` (torch's convention)."""
    if world_size(group) > 1:
        dist.broadcast(t, src=src, group=group)
    return t


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
