"""Data-parallel gradient all_reduce that moves only the kept entries of pruned weights.

Once masks are final, a pruned weight's gradient is zeroed anyway (``Constrainer`` masks it), so
reducing it is wasted bandwidth: at 20× pruning a dense all_reduce moves 20× the useful bytes.
``SparseReducer`` gathers the kept entries (flat indices cached per mask) and the full gradients
of unmasked tensors into one flat buffer, all_reduces it once, and scatters it back; pruned
entries come back exactly 0.

Requires identical masks on every rank — the buffer layout comes from them, and a rank with a
different mask would add its entries into someone else's slots silently. Masks computed by
``topk`` from identical weights are identical; ``debug=True`` checks fingerprints every call.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from elastictrain.distributed import _comm
from elastictrain.distributed.sync import check_identical


class SparseReducer:
    def __init__(self, masks: dict[str, torch.Tensor], params: dict[str, torch.Tensor], *, debug: bool = False,
                 transport: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        """``params`` fixes which gradients are reduced (and their order: sorted names); ``masks``
        (bool, each its parameter's shape) are a subset of them; the rest are reduced in full (no
        masks: a dense all_reduce in one buffer). ``transport`` sums the buffer over the ranks in
        place (default: the process group's all_reduce; e.g. ``SharedMemoryAllReduce.all_reduce_``)."""
        for n, m in masks.items():
            if n not in params:
                raise ValueError(f"SparseReducer: mask {n!r} has no parameter in params")
            if m.dtype != torch.bool or m.shape != params[n].shape:
                raise ValueError(f"SparseReducer: mask {n!r} must be bool of shape {tuple(params[n].shape)}, "
                                 f"got {m.dtype} {tuple(m.shape)}")
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) > 1:
            raise ValueError(f"SparseReducer: params must share one dtype (got {sorted(map(str, dtypes))})")
        self.names = sorted(params)
        self.masks = {n: masks[n] for n in sorted(masks)}
        self.debug = debug
        self.transport = transport
        # flat indices of the kept entries (ascending), or None for a tensor reduced in full
        self._idx: dict[str, Optional[torch.Tensor]] = {
            n: masks[n].reshape(-1).nonzero().flatten() if n in masks else None for n in self.names}
        self._sizes = [params[n].numel() if self._idx[n] is None else self._idx[n].numel() for n in self.names]
        self._numel = sum(p.numel() for p in params.values())
        self._esize = next(iter(params.values())).element_size() if params else 0

    @property
    def bytes_per_step(self) -> int:
        """What one ``all_reduce_`` moves: buffer numel × element size."""
        return sum(self._sizes) * self._esize

    @property
    def dense_bytes(self) -> int:
        """What a dense all_reduce of the same gradients would move."""
        return self._numel * self._esize

    @torch.no_grad()
    def all_reduce_(self, grads: dict[str, torch.Tensor], group=None, average: bool = True) -> None:
        """Sum (or average) ``grads`` over ranks in place; masked entries of pruned weights become 0.
        Gradients must be contiguous (they are written through ``view(-1)``)."""
        missing = [n for n in self.names if n not in grads]
        if missing:
            raise ValueError(f"SparseReducer.all_reduce_: no gradient for {missing}")
        if self.debug:
            check_identical(self.masks, "SparseReducer masks", group)
        flat = {n: grads[n].view(-1) for n in self.names}
        buf = torch.cat([flat[n] if self._idx[n] is None else flat[n].index_select(0, self._idx[n].to(flat[n].device))
                         for n in self.names])
        if self.transport is not None and group is None:
            self.transport(buf)
        else:
            _comm.all_reduce_(buf, group=group)
        W = _comm.world_size(group)
        if average and W > 1:
            buf.div_(W)
        for n, part in zip(self.names, buf.split(self._sizes)):
            idx = self._idx[n]
            if idx is None:
                flat[n].copy_(part)
            else:
                flat[n].zero_().index_copy_(0, idx.to(part.device), part)
