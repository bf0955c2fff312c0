"""Implementations of one conv / linear layer that compute only its non-zero weights.

Each is built from a plain ``nn.Conv2d`` / ``nn.Linear`` (BatchNorm already folded, pruned filters
and channels already removed by ``deploy.shrink``) and computes the same function:

- ``CSRConv2d``: the weight as a CSR matrix over filters (F × C·KH·KW), run by the compiled kernel
  (``csrc/kernel_conv.cpp``): one shifted, scaled plane add per non-zero tap. Kernel-, pattern- and
  unstructured-sparse layers all reduce to it — a pattern's kernel is its 4 taps, a pruned kernel
  none — and its threads split the filters by their non-zeros (or evenly, to measure balance).
- ``GatherConv2d`` (pure torch, the fallback where nothing compiles): the kept (filter, channel)
  kernels as one depthwise conv over the gathered input channels, summed into their filters with
  ``index_add_``.
- ``CSRLinear``: the weight as a ``torch.sparse_csr`` matrix (MKL's sparse product).

The dense module itself is the other candidate; ``autotune`` picks per layer.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from elastictrain.runtime import ext


def supports_sparse_conv(m: nn.Module) -> bool:
    """A conv the sparse paths compute: fp32, groups 1, no dilation, zero padding, square stride."""
    return (type(m) is nn.Conv2d and m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str) and m.stride[0] == m.stride[1] and m.weight.dtype == torch.float32)


def _csr(w2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow int64, col int16 or int32, val fp32) of a 2-D matrix: the compact form kept in memory."""
    nz = w2d != 0
    crow = torch.zeros(w2d.shape[0] + 1, dtype=torch.int64)
    crow[1:] = nz.sum(1).cumsum(0)
    col = nz.nonzero()[:, 1]
    small = w2d.shape[1] <= torch.iinfo(torch.int16).max
    return crow, col.to(torch.int16 if small else torch.int32), w2d[nz].contiguous()


def split_rows(crow: torch.Tensor, threads: int, by: str = "work") -> torch.Tensor:
    """Row (filter) boundaries of ``threads`` contiguous parts: equal non-zeros (``work``, at least
    one row each where possible) or equal row counts (``rows``, a plain static schedule)."""
    rows = crow.numel() - 1
    t = max(1, min(threads, rows))
    if by == "rows":
        bounds = torch.linspace(0, rows, t + 1).round().long()
    else:
        targets = torch.linspace(0, float(crow[-1]), t + 1)[1:-1]
        inner = torch.searchsorted(crow[1:].double(), targets.double(), side="left") + 1
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), inner, torch.tensor([rows])])
        bounds = torch.cummax(bounds, 0).values
    return bounds.contiguous()


class CSRConv2d(nn.Module):
    impl = "csr"

    def __init__(self, conv: nn.Conv2d, split: str = "work"):
        super().__init__()
        w = conv.weight.detach()
        crow, col, val = _csr(w.reshape(w.shape[0], -1))
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self.register_buffer("val", val)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone().contiguous())
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride[0], conv.padding
        self.split = split
        self.last_thread_seconds: Optional[torch.Tensor] = None
        self._parts: dict[int, torch.Tensor] = {}

    def part(self, threads: int) -> torch.Tensor:
        if threads not in self._parts:
            self._parts[threads] = split_rows(self.crow, threads, self.split)
        return self._parts[threads]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = ext.kernels()
        if k is None:
            raise RuntimeError(f"the compiled runtime kernels are unavailable ({ext.unavailable()})")
        (ph, pw), (kh, kw), s = self.padding, self.kernel_size, self.stride
        h, w = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
        ho, wo = (h - kh) // s + 1, (w - kw) // s + 1
        extra = -(-(kw + k.CHUNK) // w) if s == 1 else 0  # stride 1 reads whole chunks past the last row
        xp = F.pad(x, (pw, pw, ph, ph + extra)) if ph or pw or extra else x
        out, secs = k.csr_conv(xp.contiguous(), self.crow, self.col.int(), self.val, self.bias,
                               self.part(torch.get_num_threads()), kh, kw, s, ho, wo)
        self.last_thread_seconds = secs
        return out

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, nnz={self.val.numel()}"


class GatherConv2d(nn.Module):
    impl = "gather"

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        w = conv.weight.detach()
        kept = (w.flatten(2) != 0).any(2).nonzero()  # (K, 2): filter, channel of each kept kernel
        self.register_buffer("fidx", kept[:, 0].contiguous())
        self.register_buffer("cidx", kept[:, 1].contiguous())
        self.register_buffer("kernels", w[kept[:, 0], kept[:, 1]][:, None].contiguous())  # (K, 1, KH, KW)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.out_channels, self.stride, self.padding = conv.out_channels, conv.stride, conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if len(self.fidx) == 0:
            z = F.conv2d(x[:, :1], torch.zeros(1, 1, *self.kernels.shape[2:]), None, self.stride, self.padding)
            out = z.new_zeros(n, self.out_channels, *z.shape[2:])
        else:
            z = F.conv2d(x.index_select(1, self.cidx), self.kernels, None, self.stride, self.padding,
                         groups=len(self.fidx))
            out = z.new_zeros(n, self.out_channels, *z.shape[2:]).index_add_(1, self.fidx, z)
        return out if self.bias is None else out + self.bias[:, None, None]


class CSRLinear(nn.Module):
    impl = "csr"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is MKL's
            warnings.simplefilter("ignore", UserWarning)
            self.register_buffer("weight", linear.weight.detach().to_sparse_csr())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.sparse.mm(self.weight, x.t()).t()
        return out if self.bias is None else out + self.bias


def candidates(m: nn.Module) -> dict[str, nn.Module]:
    """Every implementation of ``m`` this machine can run, the dense module first."""
    out: dict[str, nn.Module] = {"dense": m}
    if type(m) is nn.Conv2d and supports_sparse_conv(m):
        if ext.kernels() is not None:
            out["csr"] = CSRConv2d(m)
        out["gather"] = GatherConv2d(m)
    elif type(m) is nn.Linear and m.weight.dtype == torch.float32:
        out["csr"] = CSRLinear(m)
    return out
