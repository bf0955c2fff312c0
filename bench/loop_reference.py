"""A per-block LOOP implementation of the composed projection, as research code writes it.

This is the baseline ``bench/projection.py`` compares the vectorised ``elastictrain.project``
against. It iterates the way the seed's ModelEval.py does — Python loops over kernels, workload
blocks and codebook groups, with small torch ops inside — and implements the same semantics:

1. pattern: for every kernel (loop over filter, channel) the top-``entries`` positions by energy
   vote for a pattern (ties: lower position); the library is the ``patterns`` most voted codes
   (ties: smaller code), sorted by code; then every kernel (second loop) takes the library pattern
   retaining the most energy (ties: the pattern with the smaller code);
2. prune steps: for every workload block (loop over the grid) keep the ``keep`` units with the
   largest score of what is still alive (kernel: sum of squares, element: |w|; ties: lower index);
3. quantize: for every codebook group (loop) run 1-D Lloyd k-means (loop over iterations) on the
   group's kept values from quantile initialisation; a group with ≤ 2^bits distinct values takes
   those values; a centroid of exactly 0 becomes the group's smallest non-zero magnitude (or eps).

Only what the benchmark spec needs is implemented (kernel/element units, local or balanced
scope, workloads and codebook groups that split filter/channel only, k-means); anything else
raises NotImplementedError rather than silently diverging.

Run it through ``.venv/bin/python bench/projection.py [--loop-layers N]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoopResult:
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    libraries: dict[str, torch.Tensor] = field(default_factory=dict)
    codebooks: dict[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- pattern pruning
def fit_library(w4: torch.Tensor, entries: int, patterns: int) -> list[int]:
    """Pattern codes (bit i = position i kept), ascending: the most voted top-``entries`` supports."""
    F, C = w4.shape[:2]
    votes: dict[int, int] = {}
    for f in range(F):
        for c in range(C):
            energy = w4[f, c].reshape(-1).pow(2)
            if not energy.sum() > 0:  # dead kernels do not vote
                continue
            top = torch.sort(energy, descending=True, stable=True).indices[:entries]
            code = 0
            for i in top.tolist():
                code |= 1 << i
            votes[code] = votes.get(code, 0) + 1
    best = sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))[:patterns]
    return sorted(code for code, _ in best) or [(1 << entries) - 1]


def library_tensor(codes: list[int], K: int) -> torch.Tensor:
    return torch.tensor([[bool(code >> i & 1) for i in range(K)] for code in codes])


def assign_patterns(w4: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
    """Element mask: every kernel keeps the library pattern retaining the most energy."""
    F, C, R, S = w4.shape
    lib_f = library.to(w4.dtype)
    shapes = [row.reshape(R, S) for row in library]
    mask = torch.zeros(F, C, R, S, dtype=torch.bool)
    for f in range(F):
        for c in range(C):
            retained = lib_f @ w4[f, c].reshape(-1).pow(2)
            mask[f, c] = shapes[int(torch.argmax(retained))]  # argmax: first maximum
    return mask


# --------------------------------------------------------------------------- balanced pruning
def select_blocks(w4: torch.Tensor, mask: torch.Tensor, step, shape4) -> torch.Tensor:
    """Narrow ``mask`` by one prune step, one workload block at a time."""
    F, C, R, S = shape4
    if step.scope != "layer" or step.at_most:
        raise NotImplementedError("loop reference: only layer/balanced prune steps")
    if step.unit == (F, C, 1, 1):
        kernel = True
    elif step.unit == tuple(shape4):
        kernel = False
    else:
        raise NotImplementedError(f"loop reference: unit grid {step.unit}")
    work = step.workload or (1, 1, 1, 1)
    if work[2:] != (1, 1):
        raise NotImplementedError("loop reference: workloads that split rows/columns")
    bf, bc = F // work[0], C // work[1]
    mask = mask.clone()
    for i in range(work[0]):
        for j in range(work[1]):
            blk = (slice(i * bf, (i + 1) * bf), slice(j * bc, (j + 1) * bc))
            cur = w4[blk] * mask[blk]
            scores = cur.pow(2).sum((2, 3)).reshape(-1) if kernel else cur.abs().reshape(-1)
            top = torch.sort(scores, descending=True, stable=True).indices[:step.keep]
            keep = torch.zeros(scores.numel(), dtype=torch.bool)
            keep[top] = True
            keep = keep.reshape(bf, bc, 1, 1) if kernel else keep.reshape(bf, bc, R, S)
            mask[blk] &= keep
    return mask


# --------------------------------------------------------------------------- quantization
def kmeans_1d(vals: torch.Tensor, L: int, iters: int) -> list[float]:
    """Codebook (ascending) for a group's sorted kept values ``vals``."""
    distinct = torch.unique(vals).tolist()
    if len(distinct) <= L:
        book = distinct or [0.0]
        book = book + [book[-1]] * (L - len(book))
    else:
        n = vals.numel()
        book = [float(vals[min(int((j + 0.5) / L * n), n - 1)]) for j in range(L)]
        prev = None
        for _ in range(iters):
            a = torch.argmin((vals[:, None] - torch.tensor(book)[None, :]).abs(), dim=1)
            if prev is not None and torch.equal(a, prev):
                break
            prev = a
            for j in range(L):
                members = vals[a == j]
                if members.numel():
                    book[j] = float(members.mean())
            book.sort()
    if 0.0 in book:  # zero is reserved for pruned weights
        nz = vals[vals != 0].abs()
        small = float(nz.min()) if nz.numel() else float(torch.finfo(vals.dtype).eps)
        book = sorted(small if b == 0 else b for b in book)
    return book


def quantize_groups(w4: torch.Tensor, mask: torch.Tensor, parts, bits: int, iters: int, method: str):
    if method != "kmeans":
        raise NotImplementedError("loop reference: only k-means codebooks")
    if tuple(parts[2:]) != (1, 1):
        raise NotImplementedError("loop reference: codebook groups that split rows/columns")
    F, C = w4.shape[:2]
    gf, gc = F // parts[0], C // parts[1]
    L = 1 << bits
    out = torch.zeros_like(w4)
    books = []
    for i in range(parts[0]):
        for j in range(parts[1]):
            blk = (slice(i * gf, (i + 1) * gf), slice(j * gc, (j + 1) * gc))
            x, m = w4[blk], mask[blk]
            book = kmeans_1d(x[m].sort().values, L, iters)
            c = torch.tensor(book, dtype=w4.dtype)
            q = c[torch.argmin((x.reshape(-1, 1) - c[None, :]).abs(), dim=1)].reshape(x.shape)
            out[blk] = torch.where(m, q, torch.zeros_like(q))
            books.append(book)
    return out, torch.tensor(books, dtype=w4.dtype)


# --------------------------------------------------------------------------- the whole mixture
@torch.no_grad()
def loop_project(weights: dict[str, torch.Tensor], plans: dict, layers: int | None = None) -> LoopResult:
    """Project the first ``layers`` planned weights (all when None) with the loop reference."""
    res = LoopResult()
    for name in list(plans)[:layers]:
        plan = plans[name]
        F, C, R, S = plan.shape4
        w4 = weights[name].detach().float().reshape(F, C, R, S)
        mask = torch.ones(F, C, R, S, dtype=torch.bool)
        if plan.pattern is not None:
            if plan.pattern.library is not None:
                raise NotImplementedError("loop reference: explicit pattern libraries")
            lib = library_tensor(fit_library(w4, plan.pattern.entries, plan.pattern.patterns), R * S)
            mask = assign_patterns(w4, lib)
            res.libraries[name] = lib
        for step in plan.steps:
            mask = select_blocks(w4, mask, step, plan.shape4)
        if plan.quantize is not None:
            qz = plan.quantize
            q4, res.codebooks[name] = quantize_groups(w4, mask, plan.quant_parts, qz.bits, qz.iters, qz.method)
        else:
            q4 = torch.where(mask, w4, torch.zeros_like(w4))
        res.weights[name] = q4.reshape(plan.shape).to(weights[name].dtype)
        res.masks[name] = mask.reshape(plan.shape)
    return res
