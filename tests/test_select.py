import torch
from hypothesis import given
from hypothesis import strategies as st

from elastictrain.constraints.topk import keep_count, topk_mask


def reference_topk(row: torch.Tensor, k: int) -> torch.Tensor:
    order = sorted(range(row.numel()), key=lambda i: (-float(row[i]), i))
    m = torch.zeros(row.numel(), dtype=torch.bool)
    m[order[:k]] = True
    return m


@given(st.integers(1, 5), st.integers(1, 80), st.integers(0, 82), st.integers(0, 2**31 - 1), st.booleans())
def test_topk_mask_is_exact_with_index_tie_break(G, B, k, seed, ties):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(G, B, generator=g)
    if ties:
        x = torch.round(x)
    m = topk_mask(x, k)
    assert (m.sum(1) == min(k, B)).all()
    for r in range(G):
        assert torch.equal(m[r], reference_topk(x[r], min(k, B)))


def test_keep_count_rounding_and_floor():
    assert keep_count(1000, ratio=50) == 20
    assert keep_count(1000, density=0.0125) == 12  # 12.5 rounds down: never more than the ratio allows
    assert keep_count(8192, ratio=10) == 819 and keep_count(3, ratio=1 / 0.7) == 2  # float error absorbed
    assert keep_count(10, ratio=1000) == 1  # a layer is never wiped out by rounding
    assert keep_count(10, ratio=1000, floor=0) == 0
    assert keep_count(7, ratio=1) == 7
