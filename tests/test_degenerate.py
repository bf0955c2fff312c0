"""Degenerate inputs to the constraint layer: all-zero / all-equal / one-non-zero weights, zero
units and workloads, codebook groups smaller than their codebook or with nothing kept, extreme
ratios, empty layers, NaN/Inf, fp64 and bf16.

The contract checked for every projection: no exception but the documented ones, no NaN/Inf in
weights or codebooks, ``verify`` passes, projecting again changes nothing, and the accounting is
JSON-safe. Documented behaviours:
- a NaN/Inf weight: ``project`` raises ``ValueError`` naming the layer (``codebook.fit`` raises too,
  ``verify`` reports it) — a non-finite weight has no magnitude to rank;
- an empty (0-element) weight: ``ConfigError`` naming the layer — at plan time for rules with a
  grid (prune, balance, quantize), from ``project`` for pattern / N:M-only rules;
- a kept weight may be exactly 0 (a workload, layer or kernel with fewer non-zeros than it keeps):
  masks keep exactly what the plan says; without quantization the extra kept entries stay 0, with
  it they take a (never zero) codebook value, so quantized masks always equal ``out != 0``;
- ratios never round a layer to 0 kept units (at least 1); a balanced workload that would keep 0
  is a ``ConfigError`` at plan time; ``pruning_ratio`` of a layer that keeps nothing is ``inf``
  (``json_safe`` writes null).
"""
import json
import math

import pytest
import torch
from helpers import coarser_grids, grids, shape4, shapes
from hypothesis import given
from hypothesis import strategies as st

from elastictrain.config import ConfigError
from elastictrain.constraints import codebook
from elastictrain.constraints.grid import Grid, as4d, block_view
from elastictrain.constraints.plan import resolve
from elastictrain.constraints.projection import project
from elastictrain.constraints.spec import parse
from elastictrain.constraints.verify import verify
from elastictrain.files import json_safe
from elastictrain.measure.accounting import format_table, report

pytestmark = pytest.mark.filterwarnings("ignore:.*equal counts need whole units")

KINDS = ["zero", "equal", "single", "sparse", "zero_blocks", "ties"]


def degenerate(kind: str, shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "zero":
        w = torch.zeros(shape)
    elif kind == "equal":  # ties everywhere, one sign
        w = torch.full(shape, 0.75)
    elif kind == "single":
        w = torch.zeros(n)
        w[int(torch.randint(n, (1,), generator=g))] = -1.5
        w = w.reshape(shape)
    elif kind == "sparse":  # most kernels / workloads / groups hold fewer non-zeros than they keep
        w = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.15)
    elif kind == "zero_blocks":  # whole filters and channels zero inside otherwise normal weights
        w = torch.randn(shape, generator=g)
        w[torch.rand(shape[0], generator=g) < 0.5] = 0
        w[:, torch.rand(shape[1], generator=g) < 0.5] = 0
    else:  # two magnitudes, both signs
        w = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0) * (1 + (torch.rand(shape, generator=g) < 0.3))
    return w.to(dtype)


def run(rule: dict, w: dict):
    plans = resolve(parse({"rules": [rule]}), {k: tuple(v.shape) for k, v in w.items()})
    out, states = project(w, plans)
    return plans, out, states


def check(rule: dict, w: dict):
    """Project and assert the whole contract; returns (plans, out, states)."""
    plans, out, states = run(rule, w)
    libs = {n: s.library for n, s in states.items() if s.library is not None}
    for n, o in out.items():
        assert o.dtype == w[n].dtype and o.shape == w[n].shape
        assert bool(torch.isfinite(o).all()), f"{n}: non-finite projected weights"
        m = states[n].mask
        assert not bool((o != 0)[~m].any()), f"{n}: non-zero outside the mask"
        plan = plans[n]
        if plan.quantize is not None:
            book = states[n].codebook
            assert book.shape == (plan.codebooks, 1 << plan.quantize.bits)
            assert bool(torch.isfinite(book).all()) and bool((book != 0).all())
            assert bool((book[:, 1:] >= book[:, :-1]).all()), "codebook rows not sorted"
            assert torch.equal(o != 0, m), "quantization changed the mask"
        for step, um in zip(plan.steps, states[n].unit_masks):  # masks keep exactly what the plan says
            if um is not None and step.workload is not None:
                assert (block_view(um, step.workload).sum(1) == step.keep).all()
            elif um is not None and step.scope == "layer":
                assert int(um.sum()) == step.keep
    assert verify(plans, out, libs) == []
    again, _ = project(out, plans, libs)  # the library is fixed per stage, as in training
    for n in out:
        assert torch.equal(again[n], out[n]), f"{n}: projecting twice changed the weights"
    rep = report(out, plans)
    json.dumps(json_safe(rep), allow_nan=False)
    format_table(rep)
    return plans, out, states


@st.composite
def rules(draw, shape):
    """Any valid mixture for ``shape``, ratios from 1 (keep all) to far more units than exist."""
    rule = {"match": "w"}
    ratio = draw(st.sampled_from([1.0, 1.5, 2.0, 4.0, 1e3, 1e9]))
    conv3 = len(shape) == 4 and shape[2] == 3
    if conv3 and draw(st.booleans()):
        rule["pattern"] = {"entries": draw(st.integers(1, 9)), "patterns": draw(st.integers(1, 4))}
    sparsity = draw(st.sampled_from(["none", "prune", "balance", "nm"]))
    if sparsity in ("prune", "balance"):
        unit = draw(grids(shape))
        rule["prune"] = {"unit": unit, "ratio": ratio, "norm": draw(st.sampled_from(["l2", "l1"]))}
        if sparsity == "balance":
            work = draw(coarser_grids(shape, unit))
            uparts = Grid(**unit).parts(shape4(shape))
            per = math.prod(uparts) // math.prod(Grid(**work).parts(uparts))
            rule["prune"]["ratio"] = draw(st.sampled_from([r for r in (1.0, 2.0, 4.0) if per // r >= 1] or [1.0]))
            rule["balance"] = work
    elif sparsity == "nm":
        m = draw(st.sampled_from([m for m in (1, 2, 4) if shape[1] % m == 0]))
        rule["nm"] = f"{draw(st.integers(1, m))}:{m}"
    if draw(st.booleans()) or len(rule) == 1:
        rule["quantize"] = {"bits": draw(st.sampled_from([1, 2, 3, 8])), "groups": draw(grids(shape)),
                            "method": draw(st.sampled_from(["kmeans", "uniform"]))}
    return rule


@given(st.data(), st.sampled_from(KINDS), st.integers(0, 2**31 - 1))
def test_degenerate_weights_under_any_mixture(data, kind, seed):
    shape = data.draw(shapes())
    rule = data.draw(rules(shape))
    check(rule, {"w": degenerate(kind, shape, seed)})


@given(st.data(), st.sampled_from(KINDS), st.integers(0, 2**31 - 1), st.sampled_from([torch.float64, torch.bfloat16]))
def test_fp64_and_bf16_weights(data, kind, seed, dtype):
    shape = data.draw(shapes())
    check(data.draw(rules(shape)), {"w": degenerate(kind, shape, seed, dtype)})


@pytest.mark.parametrize("kind", KINDS)
def test_global_pool_of_degenerate_layers_keeps_at_least_one(kind):
    w = {f"l{i}.weight": degenerate(kind, (4, 2, 3, 3), i) for i in range(3)}
    for ratio, keep in ((1.0, 24), (3.0, 8), (1e9, 1)):
        _, out, st_ = check({"match": "l*", "prune": {"unit": "kernel", "ratio": ratio, "scope": "global"}}, w)
        assert sum(int(s.unit_masks[0].sum()) for s in st_.values()) == keep  # masks: exactly, zeros or not
        assert sum(int(o.reshape(8, 9).ne(0).any(1).sum()) for o in out.values()) <= keep


# --- codebooks on tiny, constant and empty groups -------------------------------------------------

@pytest.mark.parametrize("method", ["kmeans", "uniform"])
@pytest.mark.parametrize("bits", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_codebook_groups_smaller_than_the_codebook(method, bits, dtype):
    # rows: 1, 2, 3 kept values; all-equal kept values; kept zeros only; nothing kept; all kept
    x_GB = torch.tensor([[0.5, 0, 0, 0, 0, 0], [0.5, -2, 0, 0, 0, 0], [1, 2, 3, 0, 0, 0], [0.3] * 6,
                         [0.0] * 6, [1.0] * 6, [-3, -1, 0.25, 0.5, 1, 7]], dtype=dtype)
    keep_GB = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1] * 6,
                            [1, 1, 0, 0, 0, 0], [0] * 6, [1] * 6], dtype=torch.bool)
    q, book = codebook.quantize(x_GB, keep_GB, bits, method)
    L = 1 << bits
    assert book.shape == (7, L) and book.dtype == dtype
    assert bool(torch.isfinite(book).all()) and bool((book != 0).all())
    assert bool((book[:, 1:] >= book[:, :-1]).all())
    assert torch.equal(q != 0, keep_GB)  # kept zeros take a non-zero code; pruned stay 0
    assert all(bool(torch.isin(q[g][keep_GB[g]], book[g]).all()) for g in range(7))
    # as many distinct kept values as codes (or fewer): the codebook holds them exactly
    exact = [0, 3] + ([1] if L >= 2 else []) + ([2] if L >= 3 and method == "kmeans" else [])
    for g in exact:
        assert torch.equal(q[g][keep_GB[g]], x_GB[g][keep_GB[g]])
    q2, book2 = codebook.quantize(q, keep_GB, bits, method)  # idempotent
    assert torch.equal(q2, q)


@pytest.mark.parametrize("method", ["kmeans", "uniform"])
def test_codebook_near_the_float_max_stays_finite(method):
    # Lloyd's sums and the uniform range (hi - lo) used to overflow to inf / NaN here
    x = torch.tensor([[-3.4e38, -3e38, 1e38, 3e38, 3.3e38, 3.4e38]])
    q, book = codebook.quantize(x, torch.ones_like(x, dtype=torch.bool), 1, method)
    assert bool(torch.isfinite(book).all()) and bool(torch.isfinite(q).all())
    assert torch.equal(codebook.quantize(q, q != 0, 1, method)[0], q)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_codebook_fit_refuses_non_finite_kept_values(bad):
    x = torch.tensor([[1.0, bad, 2.0, 0.0]])
    with pytest.raises(ValueError, match="NaN or Inf"):
        codebook.fit(x, torch.ones_like(x, dtype=torch.bool), 2)
    # a non-finite value that is pruned does not matter
    keep = torch.tensor([[True, False, True, False]])
    assert bool(torch.isfinite(codebook.fit(x, keep, 2)).all())


# --- NaN / Inf weights ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("rule", [{"prune": {"ratio": 2}}, {"quantize": {"bits": 2, "method": "uniform"}},
                                  {"pattern": {"entries": 4}}, {"nm": "2:4"},
                                  {"prune": {"unit": "kernel", "ratio": 2}, "balance": {"filter": 2}}])
def test_non_finite_weights_are_refused_naming_the_layer(bad, rule):
    w = torch.randn(4, 4, 3, 3)
    w[2, 1, 0, 2] = bad
    good = torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match=r"conv2\.weight: 1 NaN/Inf weight\(s\), the first at index \(2, 1, 0, 2\)"):
        run({"match": "*", **rule}, {"conv1.weight": good, "conv2.weight": w})
    plans = resolve(parse({"rules": [{"match": "*", **rule}]}), {"w": (4, 4, 3, 3)})
    assert [v.message for v in verify(plans, {"w": w})] == ["1 NaN/Inf weights"]


# --- empty layers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 16), (16, 0), (16, 0, 3, 3), (0, 4, 3, 3)])
@pytest.mark.parametrize("rule", [{"prune": {"ratio": 2}}, {"prune": {"unit": "filter", "ratio": 2}},
                                  {"quantize": {"bits": 2}}, {"prune": {"ratio": 1}, "balance": {"filter": 2}}])
def test_empty_layer_is_a_one_line_config_error_at_plan_time(shape, rule):
    with pytest.raises(ConfigError, match=r"^spec: rules\[0\]\.\S+: the \w+ axis of fc\.weight has size 0: "
                                          r"an empty weight cannot be constrained") as e:
        resolve(parse({"rules": [{"match": "*", **rule}]}), {"fc.weight": shape})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("shape,rule", [((16, 0, 3, 3), {"pattern": {"entries": 4}}),
                                        ((0, 4, 3, 3), {"pattern": {"entries": 4}}), ((0, 16), {"nm": "2:4"})])
def test_empty_layer_under_a_gridless_rule_is_refused_by_project(shape, rule):
    plans = resolve(parse({"rules": [{"match": "*", **rule}]}), {"conv.weight": shape})
    with pytest.raises(ConfigError, match=r"rules\[0\]: conv\.weight has no elements"):
        project({"conv.weight": torch.zeros(shape)}, plans)
    assert [v.message for v in verify(plans, {"conv.weight": torch.zeros(shape)})] == \
        ["an empty weight cannot be constrained"]


def test_empty_layer_can_be_exempted_and_is_reported():
    shapes_ = {"a.weight": (0, 16), "b.weight": (8, 16)}
    plans = resolve(parse({"rules": [{"match": "a.*"}, {"match": "*", "prune": {"ratio": 4}}]}), shapes_)
    assert list(plans) == ["b.weight"]
    rep = report({"a.weight": torch.zeros(0, 16), "b.weight": torch.zeros(8, 16)}, plans)
    a, b = rep["layers"]
    assert (a["params"], a["nonzeros"], a["density"], a["storage_bits"]) == (0, 0, 0.0, 0)
    assert a["pruning_ratio"] == b["pruning_ratio"] == rep["pruning_ratio"] == math.inf
    safe = json.loads(json.dumps(json_safe(rep), allow_nan=False))
    assert safe["pruning_ratio"] is None and safe["layers"][0]["pruning_ratio"] is None


# --- extreme ratios -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_extreme_ratios(kind):
    w = degenerate(kind, (4, 8, 3, 3), 7)
    for prune, kept_units in [({"ratio": 288}, 1), ({"ratio": 1e9}, 1), ({"density": 1e-9}, 1),
                              ({"unit": "filter", "ratio": 5}, 1), ({"ratio": 1}, 288),
                              ({"unit": "kernel", "ratio": 1}, 32)]:
        _, out, st_ = check({"match": "w", "prune": prune}, {"w": w})
        assert int(st_["w"].mask.sum()) == kept_units * (
            288 // {"element": 288, "filter": 4, "kernel": 32}[prune.get("unit", "element")])
        if prune.get("ratio") == 1:
            assert torch.equal(out["w"], w)  # keep all: nothing changes
    with pytest.warns(UserWarning, match=r"rules\[0\]\.balance: w keeps 1 of 2 units per workload, 2× instead of 5×"
                                         r".*at least one unit per workload"):
        run({"match": "w", "prune": {"unit": "kernel", "ratio": 5}, "balance": {"filter": 4, "channel": 4}}, {"w": w})


# --- balanced and N:M workloads with fewer non-zeros than they keep -------------------------------

@pytest.mark.parametrize("quantize", [False, True])
def test_balanced_and_nm_workloads_short_of_non_zeros(quantize):
    w = torch.zeros(4, 8)
    w[0, :6] = torch.tensor([3.0, -1, 2, 0.5, 4, 1])  # workload 0 is full, workloads 1–3 hold 0–1 non-zeros
    w[2, 5] = 7.0
    q = {"quantize": {"bits": 2, "groups": {"filter": "each"}}} if quantize else {}
    for rule in ({"prune": {"ratio": 2}, "balance": {"filter": 4}}, {"nm": "2:4"}):
        plans, out, st_ = check({"match": "w", **rule, **q}, {"w": w})
        step = plans["w"].steps[-1]
        kept = block_view(as4d(st_["w"].mask), step.workload).sum(1)
        assert (kept == step.keep).all()  # the mask is balanced, zero-valued entries included
        nnz = block_view(as4d(out["w"]) != 0, step.workload).sum(1)
        assert torch.equal(nnz, kept) if quantize else bool((nnz <= step.keep).all()) and int(nnz.min()) == 0


# --- verify: the relaxed counts still catch real violations ---------------------------------------

def test_verify_still_catches_excess_units_and_foreign_patterns():
    w = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    plans, out, _ = run({"match": "w", "prune": {"unit": "kernel", "ratio": 2}, "balance": {"filter": 2}}, {"w": w})
    bad = out["w"].clone()
    dead = (bad.reshape(16, 9) == 0).all(1).nonzero()[0, 0]
    bad.view(16, 9)[dead, 4] = 1.0  # a pruned kernel comes back: its workload keeps one unit too many
    assert any("kept units per workload differ or exceed" in v.message for v in verify(plans, {"w": bad}))

    plans, out, st_ = run({"match": "w", "pattern": {"entries": 2, "patterns": 1}}, {"w": w})
    lib = {"w": st_["w"].library}
    assert verify(plans, out, lib) == []
    k = out["w"].reshape(16, 9)
    outside = (~st_["w"].library[0]).nonzero()[0, 0]
    one = out["w"].clone()
    one.view(16, 9)[0] = 0
    one.view(16, 9)[0, outside] = 1.0  # one position, but not within the library pattern
    assert [v.field for v in verify(plans, {"w": one}, lib)] == ["rules[0].pattern.library"]
    assert [v.field for v in verify(plans, {"w": one})] == ["rules[0].pattern.patterns"]  # 2 supports > 1
    three = out["w"].clone()
    three.view(16, 9)[1, outside] = 1.0  # three positions > entries
    assert "rules[0].pattern.entries" in [v.field for v in verify(plans, {"w": three}, lib)]
    assert k.ne(0).sum(1).max() == 2
