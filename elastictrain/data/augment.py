"""Batch augmentation as tensor indexing, on whatever device the images are on.

Shapes: ``N`` images in the stored split, ``B`` in a batch, ``C`` channels, ``H×W`` stored size,
``S×T`` output size (``pad_to``, or the stored size).

A random crop with zero padding ``p`` of an image centred in a ``pad_to`` canvas, then an optional
mirror, is a single gather: output pixel ``(i, j)`` of batch item ``b`` reads stored pixel
``(top_b + i, left_b + j)`` (``left_b + T-1-j`` when mirrored), and is 0 where that falls outside
the stored image. So no padded copy of the data set or of the batch is ever made, and one indexing
kernel serves the whole batch instead of a Python loop per sample.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def canvas_offset(size: int, pad_to: Optional[int]) -> int:
    """Where a ``size`` image starts inside a centred ``pad_to`` canvas (extra pixel right/bottom)."""
    return 0 if pad_to is None else (pad_to - size) // 2


def pad_center(x_BCHW: torch.Tensor, pad_to: Optional[int]) -> torch.Tensor:
    """Zero-pad a batch to ``pad_to``×``pad_to``, image centred (the no-augmentation path)."""
    if pad_to is None:
        return x_BCHW
    h, w = x_BCHW.shape[-2:]
    top, left = canvas_offset(h, pad_to), canvas_offset(w, pad_to)
    return F.pad(x_BCHW, (left, pad_to - w - left, top, pad_to - h - top))


def gather_windows(images_NCHW: torch.Tensor, idx_B: torch.Tensor, top_B: torch.Tensor, left_B: torch.Tensor,
                   flip_B: Optional[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
    """Windows of stored images, zero outside them: B×C×S×T uint8 (see the module docstring).

    ``top_B``/``left_B`` are the stored coordinates of each window's corner and may be negative or
    run past the image; ``flip_B`` (bool) mirrors a window left-right, or None for no mirroring.
    """
    assert images_NCHW.is_contiguous(), "a strided data set would be copied whole by reshape(-1)"
    n, c, h, w = images_NCHW.shape
    s, t = out_hw
    dev = images_NCHW.device
    rows_BS = top_B[:, None] + torch.arange(s, device=dev)
    cols = torch.arange(t, device=dev)
    if flip_B is not None:
        cols = torch.where(flip_B[:, None], cols.flip(0), cols)  # B×T
    cols_BT = left_B[:, None] + cols
    inside_BST = ((rows_BS >= 0) & (rows_BS < h))[:, :, None] & ((cols_BT >= 0) & (cols_BT < w))[:, None, :]
    # flat index into the contiguous N×C×H×W storage; clamped where outside (masked below)
    pix_BST = rows_BS.clamp(0, h - 1)[:, :, None] * w + cols_BT.clamp(0, w - 1)[:, None, :]
    plane_BC = (idx_B[:, None] * c + torch.arange(c, device=dev)) * (h * w)
    flat_BCST = plane_BC[:, :, None, None] + pix_BST[:, None]
    out = images_NCHW.reshape(-1)[flat_BCST]
    return out.masked_fill_(~inside_BST[:, None], 0)


def random_crop_flip(images_NCHW: torch.Tensor, idx_B: torch.Tensor, dy_B: torch.Tensor, dx_B: torch.Tensor,
                     flip_B: Optional[torch.Tensor], padding: int, pad_to: Optional[int] = None) -> torch.Tensor:
    """Pad to ``pad_to`` (centred), pad by ``padding`` zeros, crop back at offset (dy, dx), mirror.

    ``dy_B``/``dx_B`` in ``[0, 2*padding]`` are offsets into the padded canvas, as in
    torchvision's ``RandomCrop(size, padding)``; ``(padding, padding)`` is the centre crop.
    """
    h, w = images_NCHW.shape[-2:]
    s, t = (pad_to, pad_to) if pad_to is not None else (h, w)
    top_B = dy_B - padding - canvas_offset(h, pad_to)
    left_B = dx_B - padding - canvas_offset(w, pad_to)
    return gather_windows(images_NCHW, idx_B, top_B, left_B, flip_B, (s, t))


def normalize(x_BCHW: torch.Tensor, mean_C11: torch.Tensor, std_C11: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 ``(x/255 - mean) / std`` (mean and std in [0, 1] units)."""
    return x_BCHW.float().div_(255).sub_(mean_C11).div_(std_C11)
