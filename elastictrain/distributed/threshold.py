"""Exact top-k of values sharded across ranks, with communication ∝ buckets, not ∝ values.

For global (pooled) pruning under ZeRO-3, where each rank holds only a flat shard of every
parameter: gathering 15M scores to keep 15k of them is the cost this avoids. The result equals
``topk.topk_mask`` on the concatenation of every rank's shards in rank order (then shard-list
order, then flat index), ties at the threshold included.

A distributed radix select:
0. Each value becomes an integer *key* with the same order: its IEEE bits, negatives flipped, after
   −0.0 → +0.0 (so values that compare equal have equal keys). On keys a bucket split is exact and
   always progresses — an interval shrinks B-fold a round — whereas float edges stall between
   adjacent floats and cannot split an interval ending at ±inf.
1. One all_gather of (min key, max key, count) per rank: the global interval [lo, hi] and the
   total (which validates k on every rank alike; a NaN shows as a key beyond ±inf).
2. While the interval holds more than ``max_candidates`` values and more than one key: split it into
   at most ``buckets`` aligned runs of 2^s keys (a key's bucket is ``(key >> s) − (lo >> s)``: two
   exact integer passes — ``bucketize`` against 1023 explicit edges measured 17× slower), count the
   local candidates per bucket, all_reduce(SUM) the counts, narrow to the bucket holding the k-th
   largest. A float32 key spans at most 2^32, so at most 4 rounds at B = 1024 (8 for float64).
3. all_gather each rank's candidate count, then the candidates (padded to the largest count), and
   select exactly. If the interval is one key, that key is the threshold and no values move.
Every rank receives identical data at each step, so all take the same branches: no rank can wait
in a collective that another skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from elastictrain.constraints.topk import topk_mask
from elastictrain.distributed import _comm

_KEYS = {torch.float32: (torch.int32, 0x7FFF_FFFF), torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF)}


@dataclass(slots=True)
class Traffic:
    """What a call communicated. ``bytes_sent`` is the payload each rank contributes; a ring
    all_reduce puts up to 2× that on the wire, a ring all_gather (W − 1)×."""

    collectives: int = 0
    bytes_sent: int = 0
    rounds: int = 0
    """histogram refinement rounds (each one all_reduce of the bucket counts)."""

    def note(self, t: torch.Tensor) -> torch.Tensor:
        self.collectives += 1
        self.bytes_sent += _comm.nbytes(t)
        return t


def ordered_keys(x: torch.Tensor) -> torch.Tensor:
    """Integer keys ordered like ``x`` (equal exactly where the values compare equal; NaNs sort
    beyond ±inf). float16/bfloat16/float32 → int32, float64 → int64, integers → int64."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # exact
    if x.dtype in _KEYS:
        kdt, flip = _KEYS[x.dtype]
        bits = (x + 0.0).view(kdt)  # −0.0 + 0.0 = +0.0: one key for zero
        return torch.where(bits < 0, bits ^ flip, bits)
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise ValueError(f"ordered_keys: unsupported dtype {x.dtype}")
    return x.long()


def _value(key: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The value whose key is ``key`` (inverse of ``ordered_keys``): a 0-d tensor."""
    if dtype in (torch.float16, torch.bfloat16):
        return _value(key, torch.float32, device).to(dtype)
    if dtype in _KEYS:
        kdt, flip = _KEYS[dtype]
        return torch.tensor(key ^ flip if key < 0 else key, dtype=kdt, device=device).view(dtype)
    return torch.tensor(key, dtype=dtype, device=device)


def _flat(shards: list[torch.Tensor], where: str) -> torch.Tensor:
    if not shards:
        raise ValueError(f"{where}: shards must hold at least one tensor (an empty one is fine)")
    dtypes = {s.dtype for s in shards}
    if len(dtypes) > 1:
        raise ValueError(f"{where}: shards must share one dtype (got {sorted(map(str, dtypes))})")
    return torch.cat([s.detach().reshape(-1) for s in shards])


def _interval(keys: torch.Tensor, dtype: torch.dtype, group, traffic: Traffic, where: str) -> tuple[int, int, int]:
    """Step 1: (total count, lo, hi) over all ranks; raises on every rank if any holds a NaN."""
    info = torch.iinfo(keys.dtype)
    n = keys.numel()
    lo, hi = (int(v) for v in torch.aminmax(keys)) if n else (info.max, info.min)
    st = torch.tensor([lo, hi, n], dtype=torch.int64)
    st_W3 = _comm.all_gather(traffic.note(st) if _comm.world_size(group) > 1 else st, group)
    if dtype.is_floating_point:
        inf_key = int(ordered_keys(torch.tensor(float("inf"), dtype=dtype)))
        nan_W = (st_W3[:, 2] > 0) & ((st_W3[:, 1] > inf_key) | (st_W3[:, 0] < -inf_key - 1))
        if bool(nan_W.any()):
            raise ValueError(f"{where}: scores contain NaN (on rank {nan_W.nonzero().flatten().tolist()})")
    return int(st_W3[:, 2].sum()), int(st_W3[:, 0].min()), int(st_W3[:, 1].max())


def _threshold(keys: torch.Tensor, k: int, total: int, lo: int, hi: int, group, buckets: int,
               max_candidates: int, traffic: Traffic, want_ties: bool) -> tuple[int, int, Optional[torch.Tensor]]:
    """Steps 2–3: (key of the k-th largest, global count above it, ties per rank (W,) or None)."""
    cand = keys  # local keys inside [lo, hi], in local order
    above, inside = 0, total  # global counts: keys > hi, keys in [lo, hi]
    cdt = torch.int32 if total < 2**31 else torch.int64
    while hi > lo and inside > max_candidates:
        # buckets are aligned runs of 2^sh keys: the fewest bits that leave ≤ `buckets` of them
        sh = next(b for b in range(65) if (hi >> b) - (lo >> b) < buckets)
        base, nb = lo >> sh, (hi >> sh) - (lo >> sh) + 1
        idx = (cand >> sh) - base  # exact: the true difference is < buckets, so it cannot wrap
        counts_B = _comm.all_reduce_(traffic.note(torch.bincount(idx, minlength=nb).to(cdt)), group=group)
        suffix_B = counts_B.flip(0).cumsum(0).flip(0)  # values in bucket j or above it
        j = int((above + suffix_B >= k).nonzero()[-1])  # the highest bucket that reaches rank k
        above += int(suffix_B[j]) - int(counts_B[j])
        inside = int(counts_B[j])
        lo, hi = max(lo, (base + j) << sh), min(hi, ((base + j + 1) << sh) - 1)  # Python ints: no overflow
        cand = cand[idx == j]
        traffic.rounds += 1
    if hi == lo:  # one key left: it is the threshold
        ties_W = _comm.all_gather(traffic.note(torch.tensor([cand.numel()])), group).flatten() if want_ties else None
        return lo, above, ties_W
    n_W = _comm.all_gather(traffic.note(torch.tensor([cand.numel()])), group).flatten()
    pad = torch.full((int(n_W.max()),), torch.iinfo(keys.dtype).min, dtype=keys.dtype, device=keys.device)
    pad[:cand.numel()] = cand
    g_WM = _comm.all_gather(traffic.note(pad), group)
    valid_WM = torch.arange(g_WM.shape[1], device=keys.device)[None, :] < n_W[:, None].to(keys.device)
    need = k - above  # 1 ≤ need ≤ inside
    t = int(g_WM[valid_WM].sort(descending=True).values[need - 1])
    ties_W = ((g_WM == t) & valid_WM).sum(1).cpu()
    return t, above + int(((g_WM > t) & valid_WM).sum()), ties_W


def _check_args(buckets: int, max_candidates: int, where: str) -> None:
    if buckets < 2:
        raise ValueError(f"{where}: buckets must be >= 2 (got {buckets})")
    if max_candidates < 0:
        raise ValueError(f"{where}: max_candidates must be >= 0 (got {max_candidates})")


def global_kth_largest(shards: list[torch.Tensor], k: int, group=None, *, buckets: int = 1024,
                       max_candidates: int = 4096, traffic: Optional[Traffic] = None) -> torch.Tensor:
    """The exact k-th largest value of every rank's ``shards`` together (0-d, the shards' dtype).

    ``k`` counts from 1 and must be ≤ the global count (same ``k`` on every rank). ``traffic``,
    if given, accumulates what was communicated.
    """
    where = "global_kth_largest"
    _check_args(buckets, max_candidates, where)
    traffic = traffic if traffic is not None else Traffic()
    x = _flat(shards, where)
    keys = ordered_keys(x)
    total, lo, hi = _interval(keys, x.dtype, group, traffic, where)
    if not 1 <= k <= total:
        raise ValueError(f"{where}: k must be in 1..{total} (the values on all ranks), got {k}")
    if _comm.world_size(group) == 1:
        return _value(int(torch.kthvalue(keys, total - k + 1).values), x.dtype, x.device)
    t, _, _ = _threshold(keys, k, total, lo, hi, group, buckets, max_candidates, traffic, want_ties=False)
    return _value(t, x.dtype, x.device)


def global_topk_mask(shards: list[torch.Tensor], k: int, group=None, *, buckets: int = 1024,
                     max_candidates: int = 4096, traffic: Optional[Traffic] = None) -> list[torch.Tensor]:
    """Keep masks (bool, each shard's shape) keeping exactly ``min(max(k, 0), total)`` values overall.

    Equal to ``topk.topk_mask`` on the concatenation of all ranks' flattened shards in rank
    order, then list order: ties at the threshold go to lower ranks first, which takes one
    all_gather of each rank's tie count (an exclusive prefix sum).
    """
    where = "global_topk_mask"
    _check_args(buckets, max_candidates, where)
    traffic = traffic if traffic is not None else Traffic()
    x = _flat(shards, where)
    if k <= 0:
        keep = torch.zeros_like(x, dtype=torch.bool)
    else:
        keys = ordered_keys(x)
        total, lo, hi = _interval(keys, x.dtype, group, traffic, where)
        if k >= total:
            keep = torch.ones_like(x, dtype=torch.bool)
        elif _comm.world_size(group) == 1:
            keep = topk_mask(x[None], k)[0]
        else:
            t, above, ties_W = _threshold(keys, k, total, lo, hi, group, buckets, max_candidates, traffic, True)
            me = _comm.rank(group)
            mine = min(max(k - above - int(ties_W[:me].sum()), 0), int(ties_W[me]))  # ties this rank keeps
            tied = keys == t
            keep = (keys > t) | (tied & (tied.cumsum(0) <= mine)) if mine < int(ties_W[me]) else keys >= t
    return [part.view(s.shape) for part, s in zip(keep.split([s.numel() for s in shards]), shards)]
