"""Pattern pruning: every surviving k×k kernel keeps exactly ``entries`` positions, and the
positions of every kernel form one of a small library of patterns (PatDNN, Niu et al. 2020).

Grouping: kernels are the rows of ``w.reshape(F*C, R*S)``. Selection: (1) the library is the
``patterns`` most frequent top-``entries`` supports among the non-zero kernels (PatDNN's rule;
ties by the pattern's code, so it is deterministic); (2) each kernel takes the library pattern that
retains the most energy (sum of squares). For a fixed library (2) is the exact nearest projection.

Legend: N = kernels (F*C), K = positions per kernel (R*S), P = patterns in the library.
A library is a bool (P, K) tensor, rows sorted by code (position i ↔ bit i).
"""
from __future__ import annotations

import torch

from elastictrain.constraints.topk import topk_mask


def codes_of(support_NK: torch.Tensor) -> torch.Tensor:
    """Integer code of each row's support (bit i set ↔ position i kept)."""
    bits_K = torch.ones(support_NK.shape[1], dtype=torch.int64) << torch.arange(support_NK.shape[1])
    return (support_NK.to(torch.int64) * bits_K).sum(1)


def library_from_codes(codes_P: torch.Tensor, K: int) -> torch.Tensor:
    codes_P = codes_P.sort().values
    return (codes_P[:, None] >> torch.arange(K)) & 1 == 1


def fit_library(energy_NK: torch.Tensor, entries: int, patterns: int) -> torch.Tensor:
    """The ``patterns`` most frequent top-``entries`` supports of the non-zero kernels."""
    K = energy_NK.shape[1]
    alive_N = energy_NK.sum(1) > 0
    codes = codes_of(topk_mask(energy_NK[alive_N], entries))
    if codes.numel() == 0:  # nothing alive: the first `entries` positions, so the library is never empty
        return library_from_codes(torch.tensor([(1 << entries) - 1]), K)
    if K <= 16:
        counts = torch.bincount(codes, minlength=1 << K)
        uniq = torch.nonzero(counts).squeeze(1)
        counts = counts[uniq]
    else:
        uniq, counts = torch.unique(codes, return_counts=True)
    # most frequent first; among equal counts the smaller code (uniq is ascending, sort is stable)
    order = torch.sort(counts, descending=True, stable=True).indices[:patterns]
    return library_from_codes(uniq[order], K)


def library_from_positions(positions: list[list[int]], K: int) -> torch.Tensor:
    """A library given explicitly, as lists of kept positions (row-major inside the kernel)."""
    support = torch.zeros(len(positions), K, dtype=torch.bool)
    for p, pos in enumerate(positions):
        support[p, pos] = True
    return library_from_codes(codes_of(support).unique(), K)


def assign(energy_NK: torch.Tensor, library_PK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best pattern per kernel and the energy it retains: (index_N, retained_N).

    ``argmax`` returns the first maximum, so ties go to the pattern with the smaller code.
    """
    retained_NP = energy_NK @ library_PK.to(energy_NK.dtype).T
    retained_N, index_N = retained_NP.max(1)
    return index_N, retained_N
