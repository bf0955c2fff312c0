"""1-D k-means codebooks fitted to values sharded across ranks, identical on every rank.

Under ZeRO-3 each rank holds a shard of every codebook group's kept weights. Lloyd's iteration
only needs, per centroid, the sum and the count of the values assigned to it — so each rank
assigns its own values and one all_reduce(SUM) per iteration gives every rank the same sums, hence
the same codebook. What makes it *exact* rather than merely close:

- Initialisation: L values evenly spaced from the group's global min to its global max
  (all_reduce MIN). Min and max do not depend on how values are split, unlike quantiles (the
  initialisation of ``codebook._kmeans``, which would need a distributed selection per centroid).
- Sums in fixed point: each value is rounded once to an int64 multiple of 2^-s_G, where s_G leaves
  room for the group's global count (|sum| < 2^62); integer addition is associative, so the sums,
  and the codebook, are bit-identical however the values are split — on one process included.
  The rounding is ~2^-40 of the group's largest magnitude at a million values per group.
- Convergence: the changed-assignment count rides in the same all_reduce; all ranks stop together
  once no rank changed any assignment.
- No codebook value is 0 (zero marks pruned weights): an exact 0 becomes the group's smallest
  non-zero magnitude over all ranks (the same all_reduce MIN), or eps for a group with none.
Unlike ``codebook.fit`` there is no exact shortcut for groups with ≤ 2^bits distinct values.

Legend: G = groups, N = most values a rank holds in a group, L = 2^bits levels.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from elastictrain.constraints.codebook import nearest
from elastictrain.distributed import _comm


def _pow2(e_G: torch.Tensor) -> torch.Tensor:
    """2^e exactly, as float64 built from its exponent bits (e in [-1022, 1023])."""
    return ((e_G.long() + 1023) << 52).view(torch.float64)


def distributed_kmeans(vals_GN: torch.Tensor, n_G: torch.Tensor, bits: int, iters: int, group=None,
                       traffic=None) -> torch.Tensor:
    """Codebooks (G, L), rows sorted ascending, identical on every rank of ``group``.

    ``vals_GN`` holds this rank's values of each group packed to the left (sorted or not; entries at
    positions ≥ ``n_G`` are padding, e.g. +inf). Every rank passes the same G, ``bits`` and ``iters``.
    ``traffic`` (a ``threshold.Traffic``), if given, accumulates what was communicated.
    """
    note = traffic.note if traffic is not None else (lambda t: t)
    if not 1 <= bits <= 8:
        raise ValueError(f"distributed_kmeans: bits must be 1..8 (got {bits})")
    if iters < 0:
        raise ValueError(f"distributed_kmeans: iters must be >= 0 (got {iters})")
    if not vals_GN.dtype.is_floating_point or vals_GN.dim() != 2 or n_G.shape != vals_GN.shape[:1]:
        raise ValueError(f"distributed_kmeans: need float vals (G, N) and n_G (G,), got {vals_GN.dtype} "
                         f"{tuple(vals_GN.shape)} and {tuple(n_G.shape)}")
    L, dev, dt = 1 << bits, vals_GN.device, vals_GN.dtype
    G = vals_GN.shape[0]
    if vals_GN.shape[1] == 0:
        vals_GN = torch.full((G, 1), float("inf"), dtype=dt, device=dev)
    N = vals_GN.shape[1]
    valid_GN = torch.arange(N, device=dev)[None, :] < n_G.to(dev)[:, None]
    x_GN = torch.where(valid_GN, vals_GN, torch.zeros_like(vals_GN))
    inf = torch.full_like(vals_GN, float("inf"))

    # one all_reduce(MIN): min, −max, smallest non-zero magnitude per group, −(non-finite values)
    ext = torch.cat([torch.where(valid_GN, vals_GN, inf).amin(1), torch.where(valid_GN, -vals_GN, inf).amin(1),
                     torch.where(valid_GN & (vals_GN != 0), vals_GN.abs(), inf).amin(1),
                     -(valid_GN & ~vals_GN.isfinite()).sum().to(dt).reshape(1)])
    ext = _comm.all_reduce_(note(ext), dist.ReduceOp.MIN, group)
    if float(ext[-1]) < 0:
        raise ValueError("distributed_kmeans: kept values include inf or NaN (positions < n_G must be finite)")
    lo_G, hi_G, small_G = ext[:G], -ext[G:2 * G], ext[2 * G:3 * G]
    n_tot_G = _comm.all_reduce_(note(n_G.to(device=dev, dtype=torch.int64).clone()), group=group)
    empty_G = n_tot_G == 0
    lo_G = torch.where(empty_G, torch.zeros_like(lo_G), lo_G)
    hi_G = torch.where(empty_G, torch.zeros_like(hi_G), hi_G)

    t_L = torch.arange(L, device=dev, dtype=dt) / (L - 1)
    book_GL = lo_G[:, None] + (hi_G - lo_G)[:, None] * t_L[None, :]

    # fixed point: |value| < 2^e, count < 2^nb  ⇒  |value · 2^s| · count < 2^62 with s = 62 − e − nb
    amax_G = torch.maximum(lo_G.abs(), hi_G.abs()).double()
    e_G = torch.frexp(amax_G).exponent.long()
    nb_G = torch.frexp(n_tot_G.double()).exponent.long()
    s_G = (62 - e_G - nb_G).clamp(-1000, 1000)
    q_GN = torch.round(x_GN.double() * _pow2(s_G)[:, None]).long() * valid_GN
    w_GN = valid_GN.long()

    prev_GN = None
    for _ in range(iters):
        a_GN = nearest(x_GN, book_GL)
        changed = valid_GN.sum() if prev_GN is None else ((a_GN != prev_GN) & valid_GN).sum()
        prev_GN = a_GN
        sums_GL = torch.zeros(G, L, dtype=torch.int64, device=dev).scatter_add_(1, a_GN, q_GN)
        cnts_GL = torch.zeros(G, L, dtype=torch.int64, device=dev).scatter_add_(1, a_GN, w_GN)
        buf = _comm.all_reduce_(note(torch.cat([sums_GL.view(-1), cnts_GL.view(-1), changed.view(1)])), group=group)
        if int(buf[-1]) == 0:  # no rank changed an assignment: the centroids would not move
            break
        sums_GL, cnts_GL = buf[:G * L].view(G, L), buf[G * L:2 * G * L].view(G, L)
        mean_GL = (sums_GL.double() / cnts_GL.clamp(min=1).double() * _pow2(-s_G)[:, None]).to(dt)
        book_GL = torch.where(cnts_GL > 0, mean_GL, book_GL).sort(1).values  # empty clusters stay put

    small_G = torch.where(torch.isinf(small_G), torch.full_like(small_G, torch.finfo(dt).eps), small_G)
    return torch.where(book_GL == 0, small_G[:, None].expand_as(book_GL), book_GL).sort(1).values
