"""Codebook and pattern primitives against hand-computed references."""
import torch

from elastictrain.constraints import codebook, pattern


def test_kmeans_hand_computed():
    # two clear clusters {1, 2, 3} and {10, 11}; with 1 bit Lloyd converges to their means
    x = torch.tensor([[1.0, 2.0, 3.0, 10.0, 11.0, 0.0]])
    keep = torch.tensor([[True, True, True, True, True, False]])
    book = codebook.fit(x, keep, bits=1)
    assert torch.allclose(book, torch.tensor([[2.0, 10.5]]))
    q = codebook.apply(x, keep, book)
    assert torch.equal(q, torch.tensor([[2.0, 2.0, 2.0, 10.5, 10.5, 0.0]]))


def test_group_with_few_distinct_values_keeps_them_exactly():
    x = torch.tensor([[0.3, -0.7, 0.3, 0.3], [5.0, 5.0, 5.0, 5.0]])
    keep = torch.ones_like(x, dtype=torch.bool)
    book = codebook.fit(x, keep, bits=2)
    q = codebook.apply(x, keep, book)
    assert torch.equal(q, x)
    assert torch.equal(book[1], torch.full((4,), 5.0))  # unused slots repeat the last value


def test_codebook_never_holds_zero_and_empty_groups_are_safe():
    x = torch.tensor([[-1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    keep = torch.tensor([[True, True, False, False], [False, False, False, False]])
    book = codebook.fit(x, keep, bits=1)  # one level would be the mean 0 of {-1, 1} with 1 centroid...
    assert bool((book != 0).all()) and torch.isfinite(book).all()
    book0 = codebook.fit(torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool), bits=1)
    assert torch.equal(book0, torch.tensor([[-1.0, 1.0]]))
    q = codebook.apply(x, keep, book)
    assert torch.equal(q != 0, keep)


def test_uniform_levels_span_min_to_max():
    x = torch.tensor([[0.1, 0.4, 0.7, 1.0, 0.25]])
    keep = torch.ones_like(x, dtype=torch.bool)
    book = codebook.fit(x, keep, bits=2, method="uniform")
    assert torch.allclose(book, torch.tensor([[0.1, 0.4, 0.7, 1.0]]))
    q = codebook.apply(x, keep, book)
    assert torch.allclose(q, torch.tensor([[0.1, 0.4, 0.7, 1.0, 0.1]]))  # 0.25 is a tie: lower level


def test_pattern_library_is_most_frequent_topk_supports():
    # kernels of 4 positions; supports of the top-2: {0,1} ×3, {2,3} ×2, {0,3} ×1
    e = torch.tensor([[9, 8, 1, 0], [9, 8, 0, 1], [7, 9, 2, 1], [0, 1, 9, 8], [1, 0, 8, 9], [9, 0, 1, 8.0]])
    lib = pattern.fit_library(e, entries=2, patterns=2)
    assert lib.int().tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]  # sorted by code
    idx, kept = pattern.assign(e, lib)
    assert idx.tolist() == [0, 0, 0, 1, 1, 0] and kept.tolist() == [17, 17, 16, 17, 17, 9]


def test_pattern_library_ignores_dead_kernels():
    e = torch.zeros(10, 4)
    e[0] = torch.tensor([0, 0, 5, 6.0])
    lib = pattern.fit_library(e, entries=2, patterns=1)
    assert lib.int().tolist() == [[0, 0, 1, 1]]


def test_quantize_equals_fit_then_apply_and_keeps_dtype():
    torch.manual_seed(0)
    x = torch.randn(6, 50, dtype=torch.float64)
    keep = torch.rand(6, 50) > 0.5
    q, book = codebook.quantize(x, keep, bits=3)
    assert q.dtype == torch.float64 and torch.equal(book, codebook.fit(x, keep, bits=3))
    assert torch.equal(q, codebook.apply(x, keep, book))
    assert torch.equal(q != 0, keep)


def test_kept_index_matches_block_view_path():
    from elastictrain.constraints.grid import block_unview, block_view
    torch.manual_seed(1)
    w4 = torch.randn(8, 6, 3, 3)
    mask4 = torch.rand(8, 6, 3, 3) > 0.7
    w4 = w4 * mask4
    parts = (4, 2, 1, 1)
    idx = codebook.KeptIndex(mask4, parts)
    book = idx.fit(w4, bits=2)
    assert torch.equal(book, codebook.fit(block_view(w4, parts), block_view(mask4, parts), bits=2))
    q = w4.clone()
    idx.quantize_(q, book)
    ref = block_unview(codebook.apply(block_view(w4, parts), block_view(mask4, parts), book), w4.shape, parts)
    assert torch.equal(q, ref)


def test_kept_index_fast_path_equals_the_general_one():
    """A dense layer with contiguous groups takes views instead of gathers; same values either way."""
    from elastictrain.constraints.codebook import KeptIndex

    torch.manual_seed(0)
    w = torch.randn(32, 8, 3, 3)
    for mask in (torch.ones_like(w, dtype=torch.bool), torch.rand(w.shape) > 0.3):
        fast, slow = KeptIndex(mask, (4, 1, 1, 1)), KeptIndex(mask, (4, 1, 1, 1))
        slow.identity = False
        assert fast.identity == bool(mask.all())
        book = fast.fit(w, 3)
        assert torch.equal(book, slow.fit(w, 3))
        a, b = w.clone(), w.clone()
        fast.quantize_(a, book)
        slow.quantize_(b, book)
        assert torch.equal(a, b) and torch.equal(fast.take(w), slow.take(w))
        fast.put_(a, fast.take(w))
        assert torch.equal(a, torch.where(mask, w, a))
