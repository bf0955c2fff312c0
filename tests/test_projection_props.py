"""Property tests: every kind and every mixture satisfies its constraints exactly (checked by the
independent ``verify`` and by direct counts), is idempotent, and — for unstructured and
structured pruning — keeps exactly the largest units."""
import pytest
import torch
from helpers import coarser_grids, grids, largest_kept, loop_block_view, shape4, shapes, weights
from hypothesis import assume, given
from hypothesis import strategies as st

from elastictrain.constraints.grid import Grid, block_view
from elastictrain.constraints.plan import resolve
from elastictrain.constraints.projection import project
from elastictrain.constraints.spec import parse
from elastictrain.constraints.topk import keep_count
from elastictrain.constraints.verify import verify

pytestmark = pytest.mark.filterwarnings("ignore:.*equal counts need whole units")

ratios = st.floats(1.0, 40.0, allow_nan=False)


def run(rule: dict, w: dict):
    plans = resolve(parse({"rules": [rule]}), {k: tuple(v.shape) for k, v in w.items()})
    out, states = project(w, plans)
    return plans, out, states


def assert_idempotent(plans, out, states):
    libs = {n: s.library for n, s in states.items() if s.library is not None}
    again, _ = project(out, plans)
    for n in out:
        assert torch.equal(again[n], out[n]), f"{n}: projecting twice changed the weights"
    assert verify(plans, out, libs) == []


@given(st.data(), ratios)
def test_unstructured_keeps_exactly_the_largest(data, ratio):
    shape = data.draw(shapes())
    w = data.draw(weights(shape, ties=data.draw(st.booleans())))
    plans, out, st_ = run({"match": "w", "prune": {"ratio": ratio}}, {"w": w})
    k = keep_count(w.numel(), ratio=ratio)
    kept = st_["w"].mask
    assert int(kept.sum()) == k and int((out["w"] != 0).sum()) == k
    assert torch.equal(out["w"][kept], w[kept])  # kept values untouched
    # exact, with ties resolved to the lower flat index
    order = sorted(range(w.numel()), key=lambda i: (-abs(float(w.reshape(-1)[i])), i))[:k]
    ref = torch.zeros(w.numel(), dtype=torch.bool)
    ref[order] = True
    assert torch.equal(kept.reshape(-1), ref)
    assert_idempotent(plans, out, st_)


@given(st.data(), ratios, st.sampled_from(["l2", "l1"]))
def test_structured_keeps_exactly_the_largest_units(data, ratio, norm):
    shape = data.draw(shapes())
    unit = data.draw(grids(shape))
    w = data.draw(weights(shape))
    plans, out, st_ = run({"match": "w", "prune": {"unit": unit, "ratio": ratio, "norm": norm}}, {"w": w})
    parts = Grid(**unit).parts(shape4(shape))
    blocks = loop_block_view(w.reshape(shape4(shape)), parts)
    scores = blocks.abs().sum(1) if norm == "l1" else blocks.pow(2).sum(1).sqrt()
    alive = loop_block_view(out["w"].reshape(shape4(shape)), parts).ne(0).any(1)
    keep = keep_count(blocks.shape[0], ratio=ratio)
    assert int(alive.sum()) == keep
    assert largest_kept(scores, alive)
    # a unit is kept whole or dropped whole, with its values untouched
    kept_blocks = loop_block_view(st_["w"].mask.reshape(shape4(shape)), parts)
    assert bool((kept_blocks.all(1) | ~kept_blocks.any(1)).all())
    assert_idempotent(plans, out, st_)


@given(st.data(), ratios)
def test_balanced_pruning_equal_counts_and_largest_per_workload(data, ratio):
    shape = data.draw(shapes())
    unit = data.draw(grids(shape))
    work = data.draw(coarser_grids(shape, unit))
    uparts = Grid(**unit).parts(shape4(shape))
    wparts = Grid(**work).parts(shape4(shape))
    per = (torch.Size(uparts).numel()) // torch.Size(wparts).numel()
    w = data.draw(weights(shape, ties=data.draw(st.booleans())))
    rule = {"match": "w", "prune": {"unit": unit, "ratio": ratio}, "balance": work}
    plans, out, st_ = run(rule, {"w": w})
    w4, o4 = w.reshape(shape4(shape)), out["w"].reshape(shape4(shape))
    # units per workload: unit scores laid out on the unit grid, then cut by the workload grid
    uscore = loop_block_view(w4, uparts).pow(2).sum(1).reshape(uparts)
    ualive = loop_block_view(o4, uparts).ne(0).any(1).reshape(uparts)
    wl_parts = tuple(w_ for w_ in wparts)
    s_rows, a_rows = loop_block_view(uscore, wl_parts), loop_block_view(ualive, wl_parts)
    k = keep_count(per, ratio=ratio)  # rounded down, at least one per workload
    assert (a_rows.sum(1) == k).all()
    assert k == 1 or k <= per / ratio + 1e-6  # never more than the ratio allows
    for s_row, a_row in zip(s_rows, a_rows):
        assert largest_kept(s_row, a_row)
    # element units: equal non-zeros per workload
    if unit == {"filter": "each", "channel": "each", "row": "each", "column": "each"}:
        assert loop_block_view(o4, wparts).ne(0).sum(1).unique().numel() == 1
    assert_idempotent(plans, out, st_)


@given(st.data(), ratios, st.booleans())
def test_global_scope_one_threshold_over_all_layers(data, ratio, kernel):
    shapes_ = [data.draw(shapes(conv_only=True)) for _ in range(3)]
    assume(len({s[2] for s in shapes_}) == 1 or not kernel)
    w = {f"l{i}.weight": data.draw(weights(s)) for i, s in enumerate(shapes_)}
    unit = "kernel" if kernel else "element"
    plans, out, st_ = run({"match": "l*", "prune": {"unit": unit, "ratio": ratio, "scope": "global"}}, w)
    if kernel:
        scores = torch.cat([v.reshape(v.shape[0] * v.shape[1], -1).pow(2).sum(1) for v in w.values()])
        alive = torch.cat([v.reshape(v.shape[0] * v.shape[1], -1).ne(0).any(1) for v in out.values()])
    else:
        scores = torch.cat([v.abs().reshape(-1) for v in w.values()])
        alive = torch.cat([v.ne(0).reshape(-1) for v in out.values()])
    assert int(alive.sum()) == keep_count(scores.numel(), ratio=ratio)
    assert largest_kept(scores, alive)
    assert_idempotent(plans, out, st_)


@given(st.data(), st.integers(1, 9), st.integers(1, 6), st.booleans())
def test_pattern_exact_entries_library_and_best_assignment(data, entries, patterns, connectivity):
    F, C = data.draw(st.sampled_from([2, 4, 8])), data.draw(st.sampled_from([1, 2, 4]))
    w = data.draw(weights((F, C, 3, 3)))
    rule = {"match": "w", "pattern": {"entries": entries, "patterns": patterns}}
    if connectivity:
        rule["prune"] = {"unit": "kernel", "ratio": 2}
    plans, out, st_ = run(rule, {"w": w})
    lib = st_["w"].library
    assert lib.shape[0] <= patterns and (lib.sum(1) == entries).all()
    support = out["w"].reshape(F * C, 9) != 0
    alive = support.any(1)
    assert (support[alive].sum(1) == entries).all()
    assert all(any(torch.equal(s, l) for l in lib) for s in support[alive])
    # each kernel kept the library pattern that retains the most energy
    energy = w.reshape(F * C, 9).pow(2)
    retained = (out["w"].reshape(F * C, 9).pow(2)).sum(1)
    best = (energy @ lib.float().T).max(1).values
    assert torch.allclose(retained[alive], best[alive], rtol=1e-5)
    assert_idempotent(plans, out, st_)


@given(st.data(), st.integers(1, 4), st.sampled_from(["kmeans", "uniform"]), st.floats(1.0, 4.0))
def test_quantization_codebook_sizes_and_reserved_zero(data, bits, method, ratio):
    shape = data.draw(shapes())
    groups = data.draw(grids(shape))
    w = data.draw(weights(shape))
    rule = {"match": "w", "prune": {"ratio": ratio}, "quantize": {"bits": bits, "groups": groups, "method": method}}
    plans, out, st_ = run(rule, {"w": w})
    assert torch.equal(out["w"] != 0, st_["w"].mask)  # zero stays reserved: masks unchanged
    rows = loop_block_view(out["w"].reshape(shape4(shape)), Grid(**groups).parts(shape4(shape)))
    for r in rows:
        assert r[r != 0].unique().numel() <= 2**bits
    book = st_["w"].codebook
    assert book.shape == (rows.shape[0], 2**bits) and bool((book != 0).all())
    assert_idempotent(plans, out, st_)


@given(st.data(), st.sampled_from([(1, 4), (2, 4), (2, 8), (3, 3)]))
def test_nm_sparsity(data, nm):
    n, m = nm
    F = data.draw(st.sampled_from([1, 2, 4]))
    shape = (F, m * data.draw(st.integers(1, 3)))
    w = data.draw(weights(shape))
    plans, out, st_ = run({"match": "w", "nm": f"{n}:{m}"}, {"w": w})
    blocks = out["w"].reshape(F, -1, m)
    assert (blocks.ne(0).sum(2) == n).all()
    ref = w.reshape(F, -1, m).abs().topk(n, dim=2).values.min(2).values
    assert (blocks.abs().masked_fill(blocks == 0, float("inf")).min(2).values >= ref - 1e-7).all()
    assert_idempotent(plans, out, st_)


@given(st.data(), st.floats(1.0, 6.0), st.integers(1, 3), st.booleans())
def test_full_mixture_satisfies_everything_at_once(data, ratio, bits, with_pattern):
    F = data.draw(st.sampled_from([4, 8]))
    C = data.draw(st.sampled_from([2, 4, 8]))
    w = data.draw(weights((F, C, 3, 3)))
    work = {"filter": data.draw(st.sampled_from([1, 2, 4])), "channel": data.draw(st.sampled_from([1, 2]))}
    rule = {"match": "w", "prune": {"unit": "kernel", "ratio": ratio}, "balance": work,
            "quantize": {"bits": bits, "groups": work}}
    if with_pattern:
        rule["pattern"] = {"entries": 4, "patterns": 4}
    plans, out, st_ = run(rule, {"w": w})
    o = out["w"]
    nnz_per_workload = block_view(o.ne(0), Grid(**work).parts(o.shape)).sum(1)
    if with_pattern:  # equal kept kernels × exactly `entries` positions → equal non-zeros
        assert nnz_per_workload.unique().numel() == 1
    for r in block_view(o, Grid(**work).parts(o.shape)):
        assert r[r != 0].unique().numel() <= 2**bits
    assert_idempotent(plans, out, st_)
