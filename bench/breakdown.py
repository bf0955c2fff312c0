"""Per-stage timing of the vectorised projection, built from the library's INTERNALS.

``staged_project`` re-runs what ``elastictrain.project.project`` does, stage by stage, calling the
same functions in the same order — the public ``pattern.fit_library`` / ``pattern.assign`` /
``codebook.apply`` and the private ``project._unit_scores`` / ``_select_local`` / ``_expand`` and
``codebook._compact`` / ``_distinct`` / ``_kmeans`` / ``_nonzero_values`` — with a clock around
each stage, summed over layers. It is a copy of the composition, not the library's own code path,
so ``bench/projection.py`` checks that its output equals ``project()``'s bit for bit and reports the
gap between the staged total and the timed ``project()`` call. Only local (layer / balanced)
prune steps are handled; a global pool raises NotImplementedError.

Run it through ``.venv/bin/python bench/projection.py``.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from elastictrain import codebook, pattern
from elastictrain import project as P
from elastictrain.grid import as4d, block_unview, block_view

STAGES = [
    ("pattern: fit library", "pattern.fit_library (top-4 votes, bincount)"),
    ("pattern: assign", "pattern.assign (energy @ library.T, max) + mask gather"),
    ("kernel selection", "project._unit_scores + _select_local (balanced topk_mask) + _expand"),
    ("quantize: compact", "codebook._compact (pack kept values, sort)"),
    ("quantize: distinct", "codebook._distinct (≤ 2^bits distinct groups)"),
    ("quantize: k-means", "codebook._kmeans (Lloyd iterations, all groups at once)"),
    ("quantize: non-zero fix", "codebook._nonzero_values"),
    ("quantize: apply", "codebook.apply (searchsorted) + block_unview + cast"),
    ("other", "as4d/float, masking before quantization, block_view"),
]


class Clock:
    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self.kmeans_iters: list[int] = []

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        yield
        self.t[stage] += time.perf_counter() - t0


def _kmeans_iterations(vals_GN, n_G, L, iters) -> int:
    """How many Lloyd iterations ``codebook._kmeans`` runs before it stops (for the report)."""
    G, N = vals_GN.shape
    valid = torch.arange(N)[None, :] < n_G[:, None]
    q = ((torch.arange(L, dtype=torch.float64)[None, :] + 0.5) / L * n_G[:, None]).long()
    book = vals_GN.gather(1, q.clamp(max=N - 1))
    book = torch.where(torch.isinf(book), torch.zeros_like(book), book)
    x = torch.where(valid, vals_GN, torch.zeros_like(vals_GN))
    w, prev = valid.to(x.dtype), None
    for it in range(iters):
        a = codebook.nearest(x, book)
        if prev is not None and torch.equal(a, prev):
            return it + 1
        prev = a
        sums = torch.zeros(G, L, dtype=x.dtype).scatter_add_(1, a, x * w)
        cnts = torch.zeros(G, L, dtype=x.dtype).scatter_add_(1, a, w)
        book = torch.where(cnts > 0, sums / cnts.clamp(min=1), book).sort(1).values
    return iters


@torch.no_grad()
def staged_project(weights, plans, libraries=None, count_iters: bool = False):
    """(projected weights, Clock): the composition of ``project()``, one clock per stage."""
    libraries = libraries or {}
    clk = Clock()
    w4, mask4, out = {}, {}, {}
    for n, plan in plans.items():
        with clk("other"):
            w4[n] = as4d(weights[n].detach()).float()
        if plan.pattern is None:
            mask4[n] = torch.ones(plan.shape4, dtype=torch.bool)
            continue
        F, C, R, S = plan.shape4
        lib = libraries.get(n)
        with clk("pattern: fit library"):
            energy = w4[n].reshape(F * C, R * S).pow(2)
            if lib is None:
                if plan.pattern.library is not None:
                    lib = pattern.library_from_positions(plan.pattern.library, R * S)
                else:
                    lib = pattern.fit_library(energy, plan.pattern.entries, plan.pattern.patterns)
        with clk("pattern: assign"):
            index, _ = pattern.assign(energy, lib)
            mask4[n] = lib[index].reshape(F, C, R, S)
    for s in range(max((len(p.steps) for p in plans.values()), default=0)):
        for n, plan in plans.items():
            if s >= len(plan.steps):
                continue
            step = plan.steps[s]
            if step.scope == "global":
                raise NotImplementedError("breakdown: global prune pools")
            with clk("kernel selection"):
                unit_mask = P._select_local(P._unit_scores(w4[n] * mask4[n], step), step)
                mask4[n] = mask4[n] & P._expand(unit_mask, plan.shape4)
    for n, plan in plans.items():
        m4 = mask4[n]
        with clk("other"):
            q4 = torch.where(m4, w4[n], torch.zeros_like(w4[n]))
        if plan.quantize is not None:
            qz, qp = plan.quantize, plan.quant_parts
            if qz.method != "kmeans":
                raise NotImplementedError("breakdown: only k-means codebooks")
            L = 1 << qz.bits
            with clk("other"):
                x_GB, keep_GB = block_view(q4, qp), block_view(m4, qp)
            with clk("quantize: compact"):
                vals, n_G, _ = codebook._compact(x_GB, keep_GB)
            with clk("quantize: distinct"):
                few, book = codebook._distinct(vals, n_G, L)
            if not bool(few.all()):
                with clk("quantize: k-means"):
                    many = ~few
                    book = book.clone()
                    book[many] = codebook._kmeans(vals[many], n_G[many], L, qz.iters)
                if count_iters:
                    clk.kmeans_iters.append(_kmeans_iterations(vals[~few], n_G[~few], L, qz.iters))
            with clk("quantize: non-zero fix"):
                book = codebook._nonzero_values(book, vals, n_G)
            with clk("quantize: apply"):
                q_GB, _ = codebook.apply(x_GB, keep_GB, book)
                q4 = block_unview(q_GB, plan.shape4, qp)
        with clk("quantize: apply" if plan.quantize is not None else "other"):
            out[n] = q4.reshape(plan.shape).to(weights[n].dtype)
    return out, clk
