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
- ``CSRLinear``: the weight as CSR, multiplied by MKL's sparse product.
- ``MaxPool2x2``: the 2×2 / stride-2 max pool between VGG's convs, as strided maxima (exact).

The CSR layers call ``torch.ops.elastictrain.*`` (``ops``), so a tuned model exports to ``.pt2``.

The dense module itself is the other candidate; ``autotune`` picks per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from elastictrain.runtime import ext, ops


def supports_sparse_conv(m: nn.Module) -> bool:
    """A conv the sparse paths compute: fp32, groups 1, no dilation, zero padding, square stride."""
    return (type(m) is nn.Conv2d and m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str) and m.stride[0] == m.stride[1] and m.weight.dtype == torch.float32)


MAX_CODES = 1 << 16  # distinct non-zero values a layer may have to be held as codes (uint8 ≤ 256, else uint16)


def _csr(w2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow int64, col int16 or int32, val fp32) of a 2-D matrix: the compact form kept in memory."""
    nz = w2d != 0
    crow = torch.zeros(w2d.shape[0] + 1, dtype=torch.int64)
    crow[1:] = nz.sum(1).cumsum(0)
    col = nz.nonzero()[:, 1]
    small = w2d.shape[1] <= torch.iinfo(torch.int16).max
    return crow, col.to(torch.int16 if small else torch.int32), w2d[nz].contiguous()


class _SparseValues(nn.Module):
    """The non-zero values of a CSR layer: fp32, or — when the layer has few distinct values (a
    codebook-quantized layer: each group's table) — codes into one table, dequantized per call, so
    memory holds 1–2 bytes per non-zero instead of 4."""

    def _store_values(self, val: torch.Tensor) -> None:
        table, codes = torch.unique(val, return_inverse=True)
        small = len(table) <= 256  # uint8 codes; else int16 holding code − 32768 (torch has no uint16 indexing)
        if len(table) <= MAX_CODES and len(val) * (1 if small else 2) + 4 * len(table) < 4 * len(val):  # saves bytes
            self.register_buffer("codes", codes.to(torch.uint8) if small else (codes - 32768).to(torch.int16))
            self.register_buffer("table", table.contiguous())
            self.register_buffer("val", None)
        else:
            self.register_buffer("codes", None)
            self.register_buffer("table", None)
            self.register_buffer("val", val)

    def values(self) -> torch.Tensor:
        if self.codes is None:
            return self.val
        idx = self.codes.long() if self.codes.dtype == torch.uint8 else self.codes.long() + 32768
        return self.table[idx]

    def weight_bytes(self) -> int:
        """Bytes this layer holds for its weights (CSR structure, values or codes + table, scale, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class CSRConv2d(_SparseValues):
    """The conv's weight as CSR over filters, computed by ``torch.ops.elastictrain.csr_conv``. A conv
    with a BatchNorm folded into it (``deploy.export.fold_batchnorm`` leaves the weight it had and
    the scale on it as ``unfolded``) keeps the unfolded values — its codebook's — and applies the
    scale to each filter's sum instead."""
    impl = "csr"

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        w, scale = getattr(conv, "unfolded", (conv.weight.detach(), None))
        crow, col, val = _csr(w.reshape(w.shape[0], -1))
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self._store_values(val)
        if self.codes is None and scale is not None:  # no codebook: hold the folded values themselves
            w2d = w.reshape(w.shape[0], -1)
            self.val = conv.weight.detach().reshape(w2d.shape)[w2d != 0].contiguous()
            scale = None
        self.register_buffer("scale", None if scale is None else scale.detach().float().contiguous())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone().contiguous())
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride[0], conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.csr_conv(x, self.crow, self.col, self.values(), self.bias, self.scale, *self.kernel_size,
                            self.stride, *self.padding)

    def timed(self, x: torch.Tensor, split: str, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The output and each thread's seconds, the filters split by ``split`` (``work`` / ``rows``)."""
        return ops.csr_conv_timed(x, self.crow, self.col, self.values(), self.bias, self.scale, *self.kernel_size,
                                  self.stride, *self.padding, split=split, threads=threads)

    def extra_repr(self) -> str:
        held = "fp32" if self.codes is None else f"{self.codes.dtype} codes, {len(self.table)} values"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"nnz={self.col.numel()} ({held})")


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


class CSRLinear(_SparseValues):
    """The linear layer's weight as CSR (values or codes), computed by ``torch.ops.elastictrain.csr_linear``."""
    impl = "csr"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        crow, col, val = _csr(linear.weight.detach())
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self._store_values(val)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.csr_linear(x, self.crow, self.col, self.values(), self.bias, self.in_features)


class MaxPool2x2(nn.Module):
    """2×2 max pooling with stride 2 as two element-wise maxima of strided views (rows, then
    columns): exact, and on the CPU many times faster than ``max_pool2d``'s NCHW kernel."""
    impl = "strided"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        r = torch.maximum(x[..., 0:h:2, :w], x[..., 1:h:2, :w])
        return torch.maximum(r[..., 0:w:2], r[..., 1:w:2])


def is_plain_2x2_pool(m: nn.Module) -> bool:
    return (type(m) is nn.MaxPool2d and m.kernel_size in (2, (2, 2)) and m.stride in (2, (2, 2), None)
            and m.padding in (0, (0, 0)) and m.dilation in (1, (1, 1)) and not m.ceil_mode and not m.return_indices)


def candidates(m: nn.Module) -> dict[str, nn.Module]:
    """Every implementation of ``m`` this machine can run on ``m``'s device, the dense module first
    (the compiled kernels are CPU code; on a GPU the gather path is the sparse one)."""
    out: dict[str, nn.Module] = {"dense": m}
    if is_plain_2x2_pool(m):
        return {**out, "strided": MaxPool2x2()}
    cpu = m.weight.device.type == "cpu"
    if type(m) is nn.Conv2d and supports_sparse_conv(m):
        if cpu and ext.kernels() is not None:
            out["csr"] = CSRConv2d(m)
        out["gather"] = GatherConv2d(m).to(m.weight.device)
    elif type(m) is nn.Linear and m.weight.dtype == torch.float32 and cpu:
        out["csr"] = CSRLinear(m)
    return out
