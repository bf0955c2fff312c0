"""elastictrain.distributed.shards: the projection on ZeRO-3 slices equals the one on whole weights.

References are computed in the parent: ``projection.project`` on the whole weights (masks, bit for
bit) and ``project_shards`` at world size 1 on one slice holding everything (codebooks — the
distributed k-means is split-independent, so every split must give the same codebooks and values).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import divisors
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dist import run2

from elastictrain.constraints.grid import block_view
from elastictrain.constraints.plan import resolve
from elastictrain.constraints.projection import project
from elastictrain.constraints.spec import parse
from elastictrain.constraints.verify import verify
from elastictrain.distributed.shards import Shard, ShardKept, block_ids, check_shardable, project_shards

SHAPES = {"c1.weight": (16, 8, 3, 3), "c2.weight": (16, 16, 3, 3), "c3.weight": (32, 16, 3, 3),
          "fc1.weight": (24, 64), "fc2.weight": (10, 24)}
SPECS = {
    "unstructured": {"rules": [{"match": "*", "prune": {"ratio": 7}}]},
    "kernel+filter": {"rules": [
        {"match": "c*", "prune": [{"unit": "filter", "ratio": 2}, {"unit": "kernel", "ratio": 3}]},
        {"match": "fc*", "prune": {"unit": "channel", "ratio": 2}}]},
    "pooled": {"rules": [{"match": "c*", "prune": {"ratio": 5, "scope": "global", "pool": "convs"}},
                         {"match": "fc*", "prune": {"unit": "filter", "ratio": 2, "scope": "global"}}]},
    "balanced kernels": {"rules": [
        {"match": "c*", "prune": {"unit": "kernel", "ratio": 4}, "balance": {"filter": 4, "channel": 2}},
        {"match": "fc*", "prune": {"ratio": 3}}]},
    "mixture+2bit": {"rules": [{"match": "c*", "prune": [{"unit": "kernel", "ratio": 2}, {"ratio": 3}],
                                "quantize": {"bits": 2, "groups": {"filter": 4, "channel": 2}}},
                               {"match": "fc*", "prune": {"ratio": 4}, "quantize": {"bits": 3, "method": "uniform"}}]},
}


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    w["c2.weight"].view(-1)[::7] = 0.5  # exact ties, across the slice boundary too
    return w


def _slices(n: int, world: int, uneven: bool) -> list[tuple[int, int]]:
    """ZeRO-3's split (⌈n / W⌉ per rank, the last short), or a lopsided one."""
    if uneven:
        cut = n // 5 + 1
        return [(0, cut), (cut, n - cut)]
    P = -(-n // world)
    return [(min(r * P, n), max(0, min(P, n - r * P))) for r in range(world)]


def _plans(spec: str):
    return resolve(parse(SPECS[spec]), SHAPES)


def _shard_worker(rank: int, world: int, uneven: bool):
    """Every spec on this rank's slices (one process pair for all of them)."""
    w = _weights()
    shards = {}
    for n, t in w.items():
        start, ln = _slices(t.numel(), world, uneven)[rank]
        shards[n] = Shard(t.view(-1)[start:start + ln].clone(), start, tuple(t.shape))
    results = {}
    for spec in SPECS:
        plans = _plans(spec)
        out, states = project_shards(shards, plans)
        results[spec] = {n: {"values": out[n].numpy(), "mask": states[n].mask.numpy(),
                             "book": None if states[n].codebook is None else states[n].codebook.numpy()} for n in plans}
    return results


def _single(spec: str):
    w = _weights()
    return project_shards({n: Shard(t.reshape(-1).clone(), 0, tuple(t.shape)) for n, t in w.items()}, _plans(spec))


@pytest.mark.parametrize("uneven", [False, True], ids=["zero3-split", "lopsided"])
def test_two_ranks_match_whole_weights(tmp_path, uneven):
    both = run2(tmp_path, _shard_worker, uneven)
    for spec in SPECS:
        ranks = [both[0][spec], both[1][spec]]
        plans = _plans(spec)
        whole_out, whole = project(_weights(), plans)
        one_out, one = _single(spec)
        for n in plans:
            for r in ranks:  # every rank holds the whole mask, equal to the single-process one
                assert np.array_equal(r[n]["mask"], whole[n].mask.numpy()), (spec, n)
            if plans[n].quantize is not None:
                assert np.array_equal(ranks[0][n]["book"], ranks[1][n]["book"]), (spec, n)
                assert np.array_equal(ranks[0][n]["book"], one[n].codebook.numpy()), (spec, n)
            values = np.concatenate([ranks[0][n]["values"], ranks[1][n]["values"]])
            assert np.array_equal(values, one_out[n].numpy()), (spec, n)
            if plans[n].quantize is None:
                assert np.array_equal(values, whole_out[n].reshape(-1).numpy()), (spec, n)
        joined = {n: torch.from_numpy(np.concatenate([ranks[0][n]["values"], ranks[1][n]["values"]])).view(SHAPES[n])
                  for n in plans}
        assert verify(plans, joined) == []


@given(st.sampled_from(list(SHAPES.values())), st.data())
@settings(max_examples=40, deadline=None)
def test_block_ids_are_block_view_rows(shape, data):
    shape4 = tuple(shape) + (1,) * (4 - len(shape))
    parts = tuple(data.draw(st.sampled_from(divisors(d))) for d in shape4)
    n = int(np.prod(shape4))
    start = data.draw(st.integers(0, n))
    ln = data.draw(st.integers(0, n - start))
    rows = block_view(torch.arange(n).reshape(shape4), parts)
    row_of = torch.empty(n, dtype=torch.long)
    row_of[rows.reshape(-1)] = torch.arange(rows.shape[0]).repeat_interleave(rows.shape[1])
    assert torch.equal(block_ids(shape4, parts, start, ln), row_of[start:start + ln])


def test_shard_kept_quantizes_like_the_whole_weight():
    """One slice holding everything: ShardKept's codes and values equal KeptIndex's for the same codebook."""
    from elastictrain.constraints.codebook import KeptIndex

    w = _weights()["c3.weight"]
    mask = w.abs() > 0.7
    parts = (8, 2, 1, 1)
    book = torch.sort(torch.randn(16, 4), 1).values
    a, b = w.clone(), w.clone().view(-1)
    KeptIndex(mask, parts).quantize_(a, book)
    ShardKept(mask.view(-1), 0, tuple(w.shape), parts).quantize_(b, book)
    assert torch.equal(a.view(-1), b)


@pytest.mark.parametrize("rule, what", [
    ({"match": "c1.weight", "prune": {"unit": "kernel", "ratio": 2}, "pattern": {"entries": 4, "patterns": 4}},
     "pattern"),
    ({"match": "c1.weight", "nm": "2:4"}, "N:M"),
    ({"match": "c1.weight", "prune": {"ratio": 4}, "balance": {"filter": 4}}, "balanced"),
])
def test_unsupported_on_slices_named(rule, what):
    plans = resolve(parse({"rules": [rule]}), SHAPES)
    with pytest.raises(ValueError, match="c1.weight"):
        check_shardable(plans, "stages[1].spec")


def test_mixed_pool_refused():
    spec = {"rules": [{"match": "c*", "prune": {"ratio": 5, "scope": "global", "pool": "p"}},
                      {"match": "fc*", "prune": {"unit": "filter", "ratio": 5, "scope": "global", "pool": "p"}}]}
    with pytest.raises(ValueError, match="pool mixing"):
        check_shardable(resolve(parse(spec), SHAPES))
