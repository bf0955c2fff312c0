"""Multi-codebook quantization: each group of a layer has its own tiny codebook.

Grouping comes from a grid (``grid.block_view``); selection here is a per-group codebook fit and
a nearest-value assignment, vectorised over all groups at once. Only the *kept* (mask) entries of
a group are quantized; zero stays reserved for pruned entries, so no codebook value is ever 0
and quantization never changes a mask.

- ``kmeans``: 1-D Lloyd iterations from quantile initialisation (the standard greedy
  approximation of the optimal 1-D quantizer — not the exact optimum). A group with at most
  2^bits distinct values takes exactly those values, which makes the projection idempotent.
- ``uniform``: 2^bits evenly spaced values from the group's min to its max non-zero kept value.

Legend: G = groups, B = group size, N = most kept entries in any group, L = 2^bits levels.
Codebooks are (G, L) float tensors sorted ascending; unused slots repeat the last value.
"""
from __future__ import annotations

import torch

from elastictrain.constraints.grid import block_view


def pack_slots(rows: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For kept entries listed row by row (``rows`` ascending): entries per row, each entry's slot
    in its row's packed layout, and the widest row (at least 1)."""
    n_G = torch.bincount(rows, minlength=G)
    pos = torch.arange(rows.numel(), device=rows.device) - (n_G.cumsum(0) - n_G)[rows]
    return n_G, pos, max(int(n_G.max()) if G else 0, 1)


class Packed:
    """The kept entries of each row packed to the left: ``vals_GN`` (+inf padded, in index order)
    and where each came from, so results can be scattered back. Packing first means the fit and
    the assignment touch only kept weights (0.5% of them at 200× pruning), not the whole tensor."""

    def __init__(self, x_GB: torch.Tensor, keep_GB: torch.Tensor):
        G = x_GB.shape[0]
        self.rows, self.cols = keep_GB.nonzero(as_tuple=True)  # row-major: rows ascending
        self.n_G, self.pos, N = pack_slots(self.rows, G)
        self.vals_GN = torch.full((G, N), float("inf"), dtype=x_GB.dtype)
        self.vals_GN[self.rows, self.pos] = x_GB[self.rows, self.cols]

    def unpack(self, v_GN: torch.Tensor, like_GB: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(like_GB)
        out[self.rows, self.cols] = v_GN[self.rows, self.pos]
        return out


class KeptIndex:
    """Where a layer's kept weights sit, in codebook-group order — built once per mask, so a training
    step quantizes by gathering and scattering only the kept entries (no block views, no search for
    the kept positions). ``flat`` indexes the flattened weight; (rows, pos) the packed (G, N) layout."""

    def __init__(self, mask4: torch.Tensor, parts: tuple[int, ...]):
        idx4 = torch.arange(mask4.numel(), device=mask4.device).reshape(mask4.shape)
        flat_GB, keep_GB = block_view(idx4, parts), block_view(mask4, parts)
        self.rows, cols = keep_GB.nonzero(as_tuple=True)
        self.flat = flat_GB[self.rows, cols]
        self.G = keep_GB.shape[0]
        self.n_G, self.pos, self.N = pack_slots(self.rows, self.G)
        # everything kept and the groups contiguous in memory (e.g. a dense layer with filter groups):
        # the weight *is* its packed (G, N) layout, and every gather/scatter becomes a view
        self.identity = self.flat.numel() == mask4.numel() and bool(
            (self.flat == torch.arange(mask4.numel(), device=mask4.device)).all())

    def take(self, w: torch.Tensor) -> torch.Tensor:
        """The kept entries of ``w`` (a copy), in ``flat`` order."""
        return w.reshape(-1).clone() if self.identity else w.reshape(-1)[self.flat]

    def put_(self, w: torch.Tensor, vals: torch.Tensor) -> None:
        """Write ``take``'s values back into ``w`` in place."""
        if self.identity:
            w.view(-1).copy_(vals)
        else:
            w.view(-1)[self.flat] = vals

    def packed(self, w: torch.Tensor) -> torch.Tensor:
        """Kept values of ``w`` as (G, N), +inf padded."""
        if self.identity:
            return w.reshape(self.G, self.N)
        vals = torch.full((self.G, self.N), float("inf"), dtype=w.dtype, device=w.device)
        vals[self.rows, self.pos] = w.reshape(-1)[self.flat]
        return vals

    def fit(self, w: torch.Tensor, bits: int, method: str = "kmeans", iters: int = 30) -> torch.Tensor:
        return _fit(self.packed(w).sort(1).values, self.n_G, bits, method, iters)

    @torch.no_grad()
    def quantize_(self, w: torch.Tensor, book_GL: torch.Tensor) -> None:
        """Write each kept entry's nearest codebook value into ``w`` in place (pruned entries untouched).
        One batched search over the packed (G, N) values: a per-entry search against a gathered
        (kept, L) copy of the books allocated kept × L floats per step (51 MB for a dense 800 k
        layer at 4 bits) and ran 5× slower than the step it served."""
        codes = nearest(self.packed(w), book_GL)
        if self.identity:
            w.view(self.G, self.N).copy_(book_GL.gather(1, codes))
        else:
            w.view(-1)[self.flat] = book_GL.gather(1, codes)[self.rows, self.pos]


def _distinct(vals_GN: torch.Tensor, n_G: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups whose sorted kept values hold ≤ L distinct values, and those values as a codebook."""
    G, N = vals_GN.shape
    valid = torch.arange(N)[None, :] < n_G[:, None]
    new = torch.ones_like(valid)
    new[:, 1:] = vals_GN[:, 1:] != vals_GN[:, :-1]
    new &= valid
    rank = new.cumsum(1) - 1  # index of each value's distinct class
    few_G = new.sum(1) <= L
    book = torch.zeros(G, L, dtype=vals_GN.dtype)
    sel = new & few_G[:, None]
    book[sel.nonzero(as_tuple=True)[0], rank[sel]] = vals_GN[sel]
    return few_G, _pad_sorted(book, new.sum(1).clamp(max=L))


def _pad_sorted(book_GL: torch.Tensor, used_G: torch.Tensor) -> torch.Tensor:
    """Repeat each row's last used value into its unused slots (keeps rows sorted)."""
    L = book_GL.shape[1]
    last = (used_G - 1).clamp(min=0)
    idx = torch.minimum(torch.arange(L)[None, :], last[:, None])
    return book_GL.gather(1, idx)


def nearest(vals: torch.Tensor, book_GL: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook value for each entry of (G, ·) ``vals`` (ties: lower value)."""
    mid = (book_GL[:, 1:] + book_GL[:, :-1]) / 2
    return torch.searchsorted(mid.contiguous(), vals.contiguous()).clamp(max=book_GL.shape[1] - 1)


def _kmeans(vals_GN: torch.Tensor, n_G: torch.Tensor, L: int, iters: int) -> torch.Tensor:
    G, N = vals_GN.shape
    valid = torch.arange(N)[None, :] < n_G[:, None]
    # quantile initialisation: centroid j at the (j + 0.5) / L quantile of the group's values
    q = ((torch.arange(L, dtype=torch.float64)[None, :] + 0.5) / L * n_G[:, None]).long()
    book = vals_GN.gather(1, q.clamp(max=N - 1))
    book = torch.where(torch.isinf(book), torch.zeros_like(book), book)
    x = torch.where(valid, vals_GN, torch.zeros_like(vals_GN))
    w = valid.to(vals_GN.dtype)
    prev = None
    for _ in range(iters):
        a = nearest(x, book)
        if prev is not None and torch.equal(a, prev):
            break
        prev = a
        sums = torch.zeros(G, L, dtype=x.dtype).scatter_add_(1, a, x * w)
        cnts = torch.zeros(G, L, dtype=x.dtype).scatter_add_(1, a, w)
        book = torch.where(cnts > 0, sums / cnts.clamp(min=1), book).sort(1).values
    return book


def _uniform(vals_GN: torch.Tensor, n_G: torch.Tensor, L: int) -> torch.Tensor:
    # the range of the *non-zero* kept values: a kept 0 takes a code anyway, and a level at lo = 0
    # would be replaced (zero is reserved), giving a grid that refitting the result does not reproduce
    live = (torch.arange(vals_GN.shape[1])[None, :] < n_G[:, None]) & (vals_GN != 0)
    inf = torch.full_like(vals_GN, float("inf"))
    lo = torch.where(live, vals_GN, inf).amin(1)
    hi = torch.where(live, vals_GN, -inf).amax(1)
    lo = torch.where(live.any(1), lo, torch.zeros_like(lo))
    hi = torch.where(live.any(1), hi, torch.zeros_like(hi))
    t = torch.arange(L, dtype=vals_GN.dtype) / (L - 1)
    return lo[:, None] + (hi - lo)[:, None] * t[None, :]


def _nonzero_values(book_GL: torch.Tensor, vals_GN: torch.Tensor, n_G: torch.Tensor) -> torch.Tensor:
    """Replace a codebook value of exactly 0 by the group's smallest-magnitude kept value (or the
    dtype's eps), so a kept weight never quantizes to the reserved zero."""
    mag = torch.where(torch.isinf(vals_GN) | (vals_GN == 0), torch.full_like(vals_GN, float("inf")), vals_GN.abs())
    small = mag.min(1).values
    small = torch.where(torch.isinf(small), torch.full_like(small, torch.finfo(book_GL.dtype).eps), small)
    return torch.where(book_GL == 0, small[:, None].expand_as(book_GL), book_GL).sort(1).values


def fit(x_GB: torch.Tensor, keep_GB: torch.Tensor, bits: int, method: str = "kmeans", iters: int = 30) -> torch.Tensor:
    """One codebook of 2^bits values per row of ``x_GB``, fitted to the kept entries: (G, L)."""
    packed = Packed(x_GB, keep_GB)
    return _fit(packed.vals_GN.sort(1).values, packed.n_G, bits, method, iters)


def _group_scale(vals_GN: torch.Tensor, n_G: torch.Tensor) -> torch.Tensor:
    """(G, 1): a power of two per group with |kept value| / scale < 2. Raises on NaN/Inf kept values
    (a silent NaN codebook would spread to every weight of its group)."""
    valid = torch.arange(vals_GN.shape[1])[None, :] < n_G[:, None]
    if not bool((vals_GN.isfinite() | ~valid).all()):
        raise ValueError("codebook fit: kept values include NaN or Inf (a non-finite weight has no nearest code)")
    amax_G = torch.where(valid, vals_GN.abs(), torch.zeros_like(vals_GN)).amax(1)
    exp_G = torch.frexp(amax_G).exponent  # amax < 2^exp
    return torch.pow(2.0, (exp_G - 1).to(vals_GN.dtype))[:, None]


def _fit(vals_GN: torch.Tensor, n_G: torch.Tensor, bits: int, method: str, iters: int) -> torch.Tensor:
    """Codebooks from each group's kept values, sorted ascending and +inf padded: (G, L)."""
    L = 1 << bits
    # fit vals / scale, in (-2, 2): near the dtype's max, Lloyd's sums and the uniform range (hi - lo)
    # would overflow to inf / NaN; scaling by a power of two is exact, so other results are unchanged
    scale_G1 = _group_scale(vals_GN, n_G)
    book = _fit_scaled(vals_GN / scale_G1, n_G, L, method, iters) * scale_G1
    return _nonzero_values(book, vals_GN, n_G)


def _fit_scaled(vals_GN: torch.Tensor, n_G: torch.Tensor, L: int, method: str, iters: int) -> torch.Tensor:
    if method == "uniform":
        book = _uniform(vals_GN, n_G, L)
    elif method == "kmeans":
        few_G, exact = _distinct(vals_GN, n_G, L)
        book = exact
        if not bool(few_G.all()):
            many = ~few_G
            book = exact.clone()
            book[many] = _kmeans(vals_GN[many], n_G[many], L, iters)
    else:
        raise ValueError(f"unknown codebook method {method!r} (expected 'kmeans' or 'uniform')")
    return book


def apply(x_GB: torch.Tensor, keep_GB: torch.Tensor, book_GL: torch.Tensor) -> torch.Tensor:
    """Quantize kept entries to their group's nearest codebook value; pruned entries are 0."""
    return _apply(Packed(x_GB, keep_GB), book_GL, x_GB)


def _apply(packed: Packed, book_GL: torch.Tensor, like_GB: torch.Tensor) -> torch.Tensor:
    vals = packed.vals_GN
    q_GN = book_GL.gather(1, nearest(torch.where(torch.isinf(vals), torch.zeros_like(vals), vals), book_GL))
    return packed.unpack(q_GN, like_GB)


def quantize(x_GB: torch.Tensor, keep_GB: torch.Tensor, bits: int, method: str = "kmeans",
             iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit every group's codebook and quantize its kept entries: (q_GB, codebook_GL)."""
    packed = Packed(x_GB, keep_GB)
    book = _fit(packed.vals_GN.sort(1).values, packed.n_G, bits, method, iters)
    return _apply(packed, book, x_GB), book
