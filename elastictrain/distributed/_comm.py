"""The few collectives this package uses, reading as world size 1 when torch.distributed is off.

Every wrapper is a no-op (or the trivial result) at world size 1, so the callers need no branch
for a single process and a test can run them without a process group. A tensor on the wrong
device for the backend (a CPU fingerprint under NCCL, a CUDA tensor under gloo) travels through
the backend's device and comes back where it was: the small tensors here are built on the CPU.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group=None) -> int:
    """This process's rank *in the group* (collectives order their results by it)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _wire(t: torch.Tensor, group) -> torch.Tensor:
    """``t`` on a device the group's backend can send from (itself when it already is)."""
    backend = dist.get_backend(group)
    if backend == "nccl" and not t.is_cuda:
        return t.to(f"cuda:{torch.cuda.current_device()}")
    if backend == "gloo" and t.is_cuda:
        return t.cpu()
    return t


def all_gather(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``t`` stacked in group-rank order: (W, *t.shape). Shapes must match on all ranks."""
    W = world_size(group)
    if W == 1:
        return t[None].clone()
    w = _wire(t, group).contiguous()
    out = [torch.empty_like(w) for _ in range(W)]
    dist.all_gather(out, w, group=group)
    return torch.stack(out).to(t.device)


def all_reduce_(t: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """In-place all_reduce (SUM by default); ``t`` itself at world size 1."""
    if world_size(group) > 1:
        w = _wire(t, group)
        dist.all_reduce(w, op=dist.ReduceOp.SUM if op is None else op, group=group)
        if w is not t:
            t.copy_(w)
    return t


def broadcast_(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast from global rank ``src`` (torch's convention)."""
    if world_size(group) > 1:
        w = _wire(t, group)
        dist.broadcast(w, src=src, group=group)
        if w is not t:
            t.copy_(w)
    return t


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
