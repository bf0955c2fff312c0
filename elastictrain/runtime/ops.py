"""The compiled kernels as torch operators (``torch.ops.elastictrain.*``), so a runtime model can be
traced by ``torch.export`` and saved as a ``.pt2`` whose constants are the compact sparse arrays;
loading it needs this module imported (``import elastictrain.runtime``), nothing else.

The thread split of ``csr_conv`` is decided inside the operator from the live thread count, so one
exported model runs on any number of threads.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from elastictrain.runtime import ext

_parts: dict = {}


def split_rows(crow: torch.Tensor, threads: int, by: str = "work") -> torch.Tensor:
    """Row (filter) boundaries of ``threads`` contiguous parts: equal non-zeros (``work``) or equal
    row counts (``rows``, a plain static schedule). Monotone, from 0 to the row count."""
    rows = crow.numel() - 1
    t = max(1, min(threads, rows))
    if by == "rows":
        return torch.linspace(0, rows, t + 1).round().long()
    targets = torch.linspace(0, float(crow[-1]), t + 1)[1:-1].double()
    inner = torch.searchsorted(crow[1:].double(), targets, side="left") + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), inner.clamp(max=rows), torch.tensor([rows])])
    return torch.cummax(bounds, 0).values.contiguous()


def _part(crow: torch.Tensor, threads: int, by: str) -> torch.Tensor:
    key = (crow.data_ptr(), crow.numel(), int(crow[-1]), threads, by)
    if key not in _parts:
        if len(_parts) > 4096:
            _parts.clear()
        _parts[key] = split_rows(crow, threads, by)
    return _parts[key]


def out_size(h: int, w: int, kh: int, kw: int, stride: int, ph: int, pw: int) -> tuple[int, int]:
    return (h + 2 * ph - kh) // stride + 1, (w + 2 * pw - kw) // stride + 1


def csr_conv_timed(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                   bias: Optional[torch.Tensor], scale: Optional[torch.Tensor], kh: int, kw: int, stride: int,
                   ph: int, pw: int, split: str = "work",
                   threads: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse conv and the seconds each thread spent in it (for measuring a thread split)."""
    k = ext.kernels()
    if k is None:
        raise RuntimeError(f"the compiled runtime kernels are unavailable ({ext.unavailable()})")
    ho, wo = out_size(x.shape[2], x.shape[3], kh, kw, stride, ph, pw)
    wp = x.shape[3] + 2 * pw
    extra = -(-(kw + k.CHUNK) // wp) if stride == 1 else 0  # stride 1 reads whole chunks past the last row
    xp = F.pad(x, (pw, pw, ph, ph + extra)) if ph or pw or extra else x
    part = _part(crow, threads or torch.get_num_threads(), split)
    out, secs = k.csr_conv(xp.contiguous(), crow, col.int(), val.contiguous(), bias, scale, part, kh, kw, stride,
                           ho, wo)
    return out, secs


@torch.library.custom_op("elastictrain::csr_conv", mutates_args=())
def csr_conv(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, bias: Optional[torch.Tensor],
             scale: Optional[torch.Tensor], kh: int, kw: int, stride: int, ph: int, pw: int) -> torch.Tensor:
    """conv2d of ``x`` with the F × (C·kh·kw) CSR weight (crow, col, val), zero padding (ph, pw);
    with ``scale``, each filter's sum is scaled before its bias is added."""
    return csr_conv_timed(x, crow, col, val, bias, scale, kh, kw, stride, ph, pw)[0]


@csr_conv.register_fake
def _(x, crow, col, val, bias, scale, kh, kw, stride, ph, pw):
    ho, wo = out_size(x.shape[2], x.shape[3], kh, kw, stride, ph, pw)
    return x.new_empty(x.shape[0], crow.shape[0] - 1, ho, wo)


@torch.library.custom_op("elastictrain::csr_linear", mutates_args=())
def csr_linear(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
               bias: Optional[torch.Tensor], in_features: int) -> torch.Tensor:
    """x @ Wᵀ (+ bias) with W the out × in CSR matrix (crow, col, val): MKL's sparse product."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is MKL's
        warnings.simplefilter("ignore", UserWarning)
        w = torch.sparse_csr_tensor(crow, col.long(), val, (crow.numel() - 1, in_features))
    out = torch.sparse.mm(w, x.t()).t()
    return out if bias is None else out + bias


@csr_linear.register_fake
def _(x, crow, col, val, bias, in_features):
    return x.new_empty(x.shape[0], crow.shape[0] - 1)
