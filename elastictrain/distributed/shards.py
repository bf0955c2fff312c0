"""The projection when each rank holds only a flat slice of every weight (ZeRO-3).

DeepSpeed's ZeRO-3 keeps rank r's part of a parameter as elements [r·P, (r+1)·P) of the flattened
weight (P = ⌈numel / W⌉, the last slice short). ``project_shards`` runs the one projection loop
(``projection.constrain``) over ``Slices``, the ``projection.Layout`` of slices. Nothing here
gathers a weight; what crosses the wire per mask update is ∝ units or buckets, plus 1 bit a weight
for the finished masks:

- element steps (unstructured pruning, per layer or pooled across layers): the exact distributed
  top-k of ``threshold.global_topk_mask`` — ties broken by flat index, as ``topk.topk_mask`` does
  on the whole weight, so the masks equal the single-process ones bit for bit;
- structured steps (filter / channel / kernel / any grid unit, balanced or not): each rank sums its
  elements' contributions into the unit-score vector (float64), one all_reduce(SUM) per layer gives
  every rank the same scores, and the single-process selection (``topk.unit_topk_mask`` /
  ``topk.pooled_topk_masks``) runs on them;
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

from elastictrain.constraints.codebook import nearest, pack_slots
from elastictrain.constraints.plan import LayerPlan, PruneStep
from elastictrain.constraints.projection import LayerState, Member, constrain, is_element
from elastictrain.constraints.topk import keep_count, pooled_topk_masks, unit_topk_mask
from elastictrain.distributed import _comm
from elastictrain.distributed.kmeans import distributed_kmeans
from elastictrain.distributed.sync import pack_bits, unpack_bits
from elastictrain.distributed.threshold import Traffic, global_topk_mask


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


def check_shardable(plans: dict[str, LayerPlan], where: str = "spec") -> None:
    """Raise ValueError naming the first layer whose constraints cannot be projected on slices."""
    kinds: dict[tuple, set] = {}
    for n, plan in plans.items():
        if plan.pattern is not None:
            raise ValueError(f"{where}: rules[{plan.rule}].pattern on {n}: pattern pruning picks positions inside "
                             "kernels, which ZeRO-3 slices can cut; use ZeRO 0–2 for it")
        for step in plan.steps:
            if is_element(plan, step) and step.workload is not None:
                raise ValueError(f"{where}: rules[{plan.rule}] on {n}: element-level balanced / N:M selection needs "
                                 "whole workloads on a rank; under ZeRO-3 balance structured units (e.g. kernels), "
                                 "or use ZeRO 0–2")
            if step.scope == "global":
                kinds.setdefault(step.pool, set()).add(is_element(plan, step))
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
        self.n_G, self.pos, self.N = pack_slots(self.rows, self.G)
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


class Slices:
    """The ``projection.Layout`` of this rank's slices. Element steps stay sharded (the distributed
    top-k selects on them); a structured step's unit scores are summed per rank, then all-reduced,
    so its selection and unit masks are whole and identical on every rank."""

    def __init__(self, shards: dict[str, Shard], group=None, traffic: Optional[Traffic] = None):
        self.shards, self.group = shards, group
        self.traffic = traffic if traffic is not None else Traffic()
        self._last: Optional[tuple[tuple, torch.Tensor]] = None

    def _block_ids(self, n: str, plan: LayerPlan, parts: tuple[int, ...]) -> torch.Tensor:
        """``block_ids`` of the slice, kept for the next call: a layer step scores, then expands,
        with the same ids (only the last, so at most one slice's worth of ids is held)."""
        key = (n, tuple(parts))
        if self._last is None or self._last[0] != key:
            v = self.shards[n].values
            self._last = key, block_ids(plan.shape4, parts, self.shards[n].start, v.numel(), v.device)
        return self._last[1]

    def scores(self, n: str, plan: LayerPlan, step: PruneStep, cur: torch.Tensor) -> torch.Tensor:
        if is_element(plan, step):
            return cur.abs()  # the slice's own (n,): selected by the distributed top-k
        part = cur.abs() if step.norm == "l1" else cur.pow(2)
        ids = self._block_ids(n, plan, step.unit)
        scores_U = torch.zeros(step.units, dtype=torch.float64, device=cur.device).index_add_(0, ids, part.double())
        return _comm.all_reduce_(self.traffic.note(scores_U), group=self.group).reshape(step.unit)

    def select(self, plan: LayerPlan, step: PruneStep, scores: torch.Tensor) -> torch.Tensor:
        if is_element(plan, step):  # no workload here: check_shardable refused element balance / N:M
            return global_topk_mask([scores], step.keep, self.group, traffic=self.traffic)[0]
        return unit_topk_mask(scores, step.keep, step.workload)

    def select_pool(self, step: PruneStep, members: list[Member]) -> list[torch.Tensor]:
        scores = [sc for _, _, sc in members]
        if is_element(members[0][1], step):  # sharded scores: one distributed top-k over all members
            total = sum(plan.params for _, plan, _ in members)
            return global_topk_mask(scores, keep_count(total, density=step.fraction), self.group, traffic=self.traffic)
        return pooled_topk_masks(scores, step.fraction)  # whole scores: the same on every rank

    def expand(self, n: str, plan: LayerPlan, keep_U: torch.Tensor) -> torch.Tensor:
        return keep_U.reshape(-1)[self._block_ids(n, plan, tuple(keep_U.shape))]

    def quantize(self, n: str, plan: LayerPlan, q: torch.Tensor,
                 keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = plan.quantize
        kept = ShardKept(keep, self.shards[n].start, plan.shape4, plan.quant_parts, self.group, self.traffic)
        book = kept.fit(q, cfg.bits, cfg.method, cfg.iters)
        kept.quantize_(q, book)
        return q, book


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
    q = constrain(Slices(shards, group, traffic), x, keep, plans, states)
    for n, mask in gather_masks(keep, {n: shards[n] for n in plans}, group, traffic).items():
        states[n].mask = mask
    return {n: q[n].to(shards[n].values.dtype) for n in plans}, states
