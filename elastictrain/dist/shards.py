"""The projection when each rank holds only a flat slice of every weight (ZeRO-3).

DeepSpeed's ZeRO-3 keeps rank r's part of a parameter as elements [r·P, (r+1)·P) of the flattened
weight (P = ⌈numel / W⌉, the last slice short). Nothing here gathers a weight; what crosses the
wire per mask update is ∝ units or buckets, plus 1 bit a weight for the finished masks:

- element steps (unstructured pruning, per layer or pooled across layers): the exact distributed
  top-k of ``threshold.global_topk_mask`` — ties broken by flat index, as ``select.topk_mask`` does
  on the whole weight, so the masks equal the single-process ones bit for bit;
- structured steps (filter / channel / kernel / any grid unit, balanced or not): each rank sums its
  elements' contributions into the unit-score vector (float64), one all_reduce(SUM) per layer gives
  every rank the same scores, and the single-process selection runs on them (``projection``);
- codebooks: ``kmeans.distributed_kmeans`` over each group's kept values (fixed-point sums: the
  codebooks do not depend on how the weight is split). ``uniform`` is its 0-iteration case;
- the finished element masks are all-gathered packed (1 bit a weight), so every rank holds the
  whole masks — the constrainer zeroes full-shape gradients with them before reduce-scatter.
Not supported on shards (``check_shardable`` names the layer before any work starts): pattern
pruning and element-level balanced / N:M steps, which select within kernels or tiles that a slice
boundary can cut; pools mixing element and structured steps.

Legend: n = elements in this rank's slice; U = units of a step's grid; G = codebook groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..codebook import _slots, nearest
from ..plan import LayerPlan, Step
from ..projection import LayerState, _select_local, _select_pool
from ..select import keep_count
from . import _comm
from .kmeans import distributed_kmeans
from .sync import pack_bits, unpack_bits
from .threshold import Traffic, global_topk_mask


@dataclass(slots=True)
class Shard:
    """This rank's contiguous slice of one weight."""

    values: torch.Tensor
    """flat (n,), a view: writes land in the rank's partition."""
    start: int
    """offset of ``values[0]`` in the flattened weight."""
    shape: tuple[int, ...]
    """the whole weight's shape."""


def block_ids(shape4: tuple[int, ...], parts: tuple[int, ...], start: int, n: int, device=None) -> torch.Tensor:
    """For flat elements [start, start + n) of a ``shape4`` weight: the row of ``grid.block_view``
    (with ``parts``) each one falls in. (n,) int64."""
    F, C, R, S = shape4
    b = (F // parts[0], C // parts[1], R // parts[2], S // parts[3])
    i = torch.arange(start, start + n, device=device)
    s, i = i % S, i // S
    r, i = i % R, i // R
    c, f = i % C, i // C
    return ((f // b[0] * parts[1] + c // b[1]) * parts[2] + r // b[2]) * parts[3] + s // b[3]


def _element(plan: LayerPlan, step: Step) -> bool:
    return step.unit == plan.shape4


def check_shardable(plans: dict[str, LayerPlan], where: str = "spec") -> None:
    """Raise ValueError naming the first layer whose constraints cannot be projected on slices."""
    kinds: dict[tuple, set] = {}
    for n, plan in plans.items():
        if plan.pattern is not None:
            raise ValueError(f"{where}: rules[{plan.rule}].pattern on {n}: pattern pruning picks positions inside "
                             "kernels, which ZeRO-3 slices can cut; use ZeRO 0–2 for it")
        for s, step in enumerate(plan.steps):
            if _element(plan, step) and step.workload is not None:
                raise ValueError(f"{where}: rules[{plan.rule}] on {n}: element-level balanced / N:M selection needs whole "
                                 "workloads on a rank; under ZeRO-3 balance structured units (e.g. kernels), or use ZeRO 0–2")
            if step.scope == "global":
                kinds.setdefault(step.pool, set()).add(_element(plan, step))
                if len(kinds[step.pool]) > 1:
                    raise ValueError(f"{where}: rules[{plan.rule}] on {n}: a pool mixing element and structured units "
                                     "cannot be selected on ZeRO-3 slices")


class ShardKept:
    """``codebook.KeptIndex`` for a slice: the slice's kept entries in codebook-group order.
    ``flat`` indexes the slice; ``rows`` is each entry's group; (rows, pos) the packed (G, N) layout."""

    def __init__(self, keep_n: torch.Tensor, start: int, shape4: tuple[int, ...], parts: tuple[int, ...], group=None,
                 traffic: Optional[Traffic] = None):
        flat = keep_n.nonzero().squeeze(1)
        rows = block_ids(shape4, parts, start, keep_n.numel(), keep_n.device)[flat]
        order = rows.argsort(stable=True)
        self.flat, self.rows = flat[order], rows[order]
        self.G = parts[0] * parts[1] * parts[2] * parts[3]
        self.n_G, self.pos, self.N = _slots(self.rows, self.G)
        self.group, self.traffic = group, traffic

    def packed(self, x_n: torch.Tensor) -> torch.Tensor:
        vals = torch.full((self.G, self.N), float("inf"), dtype=x_n.dtype, device=x_n.device)
        vals[self.rows, self.pos] = x_n.reshape(-1)[self.flat]
        return vals

    def fit(self, x_n: torch.Tensor, bits: int, method: str = "kmeans", iters: int = 30) -> torch.Tensor:
        """Codebooks (G, 2^bits), identical on every rank — a collective: all ranks call it together."""
        if method not in ("kmeans", "uniform"):
            raise ValueError(f"unknown codebook method {method!r} (expected 'kmeans' or 'uniform')")
        return distributed_kmeans(self.packed(x_n), self.n_G, bits, iters if method == "kmeans" else 0, self.group,
                                  self.traffic)

    @torch.no_grad()
    def quantize_(self, x_n: torch.Tensor, book_GL: torch.Tensor) -> None:
        codes = nearest(self.packed(x_n), book_GL)  # one batched search (see codebook.KeptIndex.quantize_)
        x_n.view(-1)[self.flat] = book_GL.gather(1, codes)[self.rows, self.pos].to(x_n.dtype)

    def take(self, x_n: torch.Tensor) -> torch.Tensor:
        return x_n.reshape(-1)[self.flat]

    def put_(self, x_n: torch.Tensor, vals: torch.Tensor) -> None:
        x_n.view(-1)[self.flat] = vals


def gather_masks(keep: dict[str, torch.Tensor], shards: dict[str, Shard], group=None,
                 traffic: Optional[Traffic] = None) -> dict[str, torch.Tensor]:
    """Every layer's whole mask from every rank's slice masks: one all_gather of the slices'
    (start, length) and one of their packed bits (all layers in one buffer)."""
    traffic = traffic if traffic is not None else Traffic()
    names = list(keep)
    spans = torch.tensor([[shards[n].start, keep[n].numel()] for n in names], dtype=torch.int64).reshape(-1, 2)
    spans_WL2 = _comm.all_gather(traffic.note(spans), group)
    bits = pack_bits(torch.cat([keep[n].reshape(-1) for n in names])) if names else torch.zeros(0, dtype=torch.uint8)
    width = _comm.all_gather(torch.tensor([bits.numel()]), group).max()
    padded = torch.zeros(int(width), dtype=torch.uint8, device=bits.device)
    padded[:bits.numel()] = bits
    bits_WB = _comm.all_gather(traffic.note(padded), group)
    out = {n: torch.zeros(shards[n].shape, dtype=torch.bool, device=keep[n].device) for n in names}
    for r in range(bits_WB.shape[0]):
        lens = spans_WL2[r, :, 1]
        flat = unpack_bits(bits_WB[r], int(lens.sum()))
        for n, part, (s, ln) in zip(names, flat.split(lens.tolist()), spans_WL2[r].tolist()):
            out[n].view(-1)[s:s + ln] = part.to(out[n].device)
    return out


@torch.no_grad()
def project_shards(shards: dict[str, Shard], plans: dict[str, LayerPlan], group=None,
                   traffic: Optional[Traffic] = None) -> tuple[dict[str, torch.Tensor], dict[str, LayerState]]:
    """``projection.project`` on slices: (each rank's projected slices, per-layer state with whole
    masks and codebooks, identical on every rank). Every rank calls it with the same plans."""
    check_shardable(plans)
    traffic = traffic if traffic is not None else Traffic()
    x = {n: shards[n].values.detach().reshape(-1).to(torch.promote_types(shards[n].values.dtype, torch.float32))
         for n in plans}
    keep = {n: torch.ones_like(x[n], dtype=torch.bool) for n in plans}
    states = {n: LayerState(mask=torch.empty(0)) for n in plans}
    for s in range(max((len(p.steps) for p in plans.values()), default=0)):
        pools: dict[tuple, list] = {}
        for n, plan in plans.items():
            if s >= len(plan.steps):
                continue
            step = plan.steps[s]
            cur = torch.where(keep[n], x[n], torch.zeros_like(x[n]))
            if _element(plan, step):
                states[n].unit_masks.append(None)
                if step.scope == "global":
                    pools.setdefault(step.pool, []).append((n, cur.abs()))
                else:
                    keep[n] &= global_topk_mask([cur.abs()], step.keep, group, traffic=traffic)[0]
                continue
            ids = block_ids(plan.shape4, step.unit, shards[n].start, cur.numel(), cur.device)
            part = cur.abs() if step.norm == "l1" else cur.pow(2)
            scores = torch.zeros(step.units, dtype=torch.float64, device=cur.device).index_add_(0, ids, part.double())
            scores = _comm.all_reduce_(traffic.note(scores), group=group).reshape(step.unit)
            if step.scope == "global":
                pools.setdefault(step.pool, []).append((n, scores))
                continue
            unit_mask = _select_local(scores, step)
            states[n].unit_masks.append(unit_mask)
            keep[n] &= unit_mask.reshape(-1)[ids]
        for members in pools.values():
            first = plans[members[0][0]]
            fraction = first.steps[s].fraction
            if _element(first, first.steps[s]):  # sharded scores: the distributed top-k over all members
                total = sum(plans[n].params for n, _ in members)
                masks = global_topk_mask([sc for _, sc in members], keep_count(total, density=fraction), group,
                                         traffic=traffic)
                for (n, _), m in zip(members, masks):
                    keep[n] &= m
                continue
            for n, unit_mask in _select_pool(members, fraction):  # whole scores: the same on every rank
                states[n].unit_masks.append(unit_mask)
                ids = block_ids(plans[n].shape4, unit_mask.shape, shards[n].start, x[n].numel(), x[n].device)
                keep[n] &= unit_mask.reshape(-1)[ids]

    out: dict[str, torch.Tensor] = {}
    for n, plan in plans.items():
        q = torch.where(keep[n], x[n], torch.zeros_like(x[n]))
        if plan.quantize is not None:
            kept = ShardKept(keep[n], shards[n].start, plan.shape4, plan.quant_parts, group, traffic)
            book = kept.fit(q, plan.quantize.bits, plan.quantize.method, plan.quantize.iters)
            kept.quantize_(q, book)
            states[n].codebook = book
        out[n] = q.to(shards[n].values.dtype)
    for n, mask in gather_masks(keep, {n: shards[n] for n in plans}, group, traffic).items():
        states[n].mask = mask
    return out, states
