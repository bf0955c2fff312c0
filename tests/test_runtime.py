"""The runtime for constrained layers: every implementation of a layer computes the dense layer's
function (kernel-, pattern-, unstructured-sparse and dense weights; strides, padding, 1×1 and 3×3,
with and without bias; 1 and 2 threads, either thread split), the thread split balances what it
says it balances, and an autotuned deployed model keeps the masked model's logits and top-1."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from elastictrain.runtime import apply, autotune, ext
from elastictrain.runtime.layers import CSRConv2d, CSRLinear, GatherConv2d, candidates
from elastictrain.runtime.ops import split_rows

TOL = 1e-5


@pytest.fixture(autouse=True)
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def sparse_conv(cin, cout, k, stride, padding, bias, kind, seed=0) -> nn.Conv2d:
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        if bias:
            conv.bias.copy_(torch.randn(cout, generator=g))
        w = conv.weight
        if kind == "kernel":  # 10% of (filter, channel) kernels kept, whole
            w.mul_((torch.rand(cout, cin, 1, 1, generator=g) < 0.1).float())
        elif kind == "pattern":  # kept kernels have 4 of k*k taps from 3 patterns
            pats = torch.stack([torch.randperm(k * k, generator=g)[:min(4, k * k)] for _ in range(3)])
            mask = torch.zeros(cout, cin, k * k)
            which = torch.randint(0, 3, (cout, cin), generator=g)
            mask.scatter_(2, pats[which], 1.0)
            mask *= (torch.rand(cout, cin, 1, generator=g) < 0.3).float()
            w.mul_(mask.view_as(w))
        elif kind == "unstructured":
            w.mul_((torch.rand(w.shape, generator=g) < 0.01).float())
        elif kind == "empty-filters":  # whole filters zero: their output is the bias alone
            w[: cout // 2] = 0
    return conv.eval()


CASES = [(8, 16, 3, 1, 1, True, "kernel"), (8, 16, 3, 1, 1, False, "pattern"), (16, 12, 3, 2, 1, True, "unstructured"),
         (6, 10, 1, 1, 0, True, "kernel"), (6, 10, 3, 1, 0, True, "dense"), (4, 6, 3, 2, 0, False, "pattern"),
         (5, 8, 3, 1, 1, True, "empty-filters")]


@pytest.mark.parametrize("cin,cout,k,stride,padding,bias,kind", CASES)
def test_sparse_convs_compute_the_dense_conv(cin, cout, k, stride, padding, bias, kind):
    conv = sparse_conv(cin, cout, k, stride, padding, bias, kind)
    x = torch.randn(3, cin, 11, 9)
    with torch.inference_mode():
        ref = conv(x)
        impls = {"gather": GatherConv2d(conv)}
        if ext.kernels() is not None:
            csr = CSRConv2d(conv)
            impls.update(csr=csr, csr_rows=lambda x: csr.timed(x, "rows", torch.get_num_threads())[0])
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, m in impls.items():
                got = m(x)
                assert got.shape == ref.shape, name
                assert (got - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item()), (name, threads)


def test_compiled_kernels_build_here():
    """``make setup`` builds them on a fresh machine; the suite runs on one, so they must be there."""
    assert ext.kernels() is not None, ext.unavailable()


def test_csr_keeps_only_non_zero_taps_compactly():
    conv = sparse_conv(8, 16, 3, 1, 1, True, "pattern")
    m = CSRConv2d(conv)
    assert m.val.numel() == int((conv.weight != 0).sum())
    assert m.col.dtype == torch.int16  # 8·9 columns: 2 bytes each, not 8
    assert int(m.crow[-1]) == m.val.numel() and m.crow.numel() == 17


@pytest.mark.parametrize("by", ["work", "rows"])
def test_thread_split_covers_every_filter_and_balances_what_it_says(by):
    g = torch.Generator().manual_seed(3)
    nnz = torch.randint(0, 50, (37,), generator=g)
    crow = torch.cat([torch.zeros(1, dtype=torch.long), nnz.cumsum(0)])
    for t in (1, 2, 3, 8):
        b = split_rows(crow, t, by)
        assert b[0] == 0 and b[-1] == 37 and len(b) == t + 1 and bool((b[1:] >= b[:-1]).all())
        sizes = b[1:] - b[:-1]
        work = crow[b[1:]] - crow[b[:-1]]
        if by == "rows":
            assert int(sizes.max() - sizes.min()) <= 1
        else:  # every part is within one filter's work of an equal share
            assert float((work - crow[-1] / t).abs().max()) <= int(nnz.max())


def test_csr_linear_and_candidates():
    lin = nn.Linear(64, 10)
    with torch.no_grad():
        lin.weight.mul_((torch.rand(lin.weight.shape) < 0.05).float())
    x = torch.randn(5, 64)
    with torch.inference_mode():
        assert (CSRLinear(lin)(x) - lin(x)).abs().max().item() <= TOL
    assert list(candidates(lin)) == ["dense", "csr"]
    grouped = nn.Conv2d(4, 4, 3, groups=4)
    assert list(candidates(grouped)) == ["dense"]  # depthwise: nothing sparse to offer


def test_autotuned_vggcpu_at_100x_kernel_keeps_logits_and_top1():
    """A kernel-pruned VGG-CPU (one-shot, spec as in the research release's table), shrunk and folded
    as ``deploy`` does, then tuned: each layer's choice is its fastest exact candidate, and the tuned
    model's logits are the masked model's."""
    from bn_stats import randomize_bn

    from elastictrain.compress import compress_state_dict
    from elastictrain.constraints.spec import parse
    from elastictrain.deploy import shrink
    from elastictrain.deploy.export import fold_batchnorm
    from elastictrain.models import build_model

    torch.manual_seed(0)
    model = build_model("vggcpu", 10, 1).eval()
    randomize_bn(model, torch.Generator().manual_seed(1))
    spec = parse({"rules": [{"match": "features.*.weight", "layer": "conv",
                             "prune": {"unit": "kernel", "ratio": 100, "scope": "global"}},
                            {"match": "classifier*.weight", "prune": {"ratio": 10}}]})
    model.load_state_dict(compress_state_dict(dict(model.state_dict()), spec).state_dict)
    x = torch.randn(16, 1, 28, 28)
    with torch.inference_mode():
        ref = model(x)
    small, _ = shrink(model, x[:1])
    deployed = fold_batchnorm(small).eval()
    tuning = autotune(deployed, x, warmup=1, runs=3)
    assert {c.name for c in tuning.layers} == {n for n, m in deployed.named_modules()
                                               if type(m) in (nn.Conv2d, nn.Linear, nn.MaxPool2d)}
    for c in tuning.layers:
        assert "dense" in c.ms and c.impl == min(c.ms, key=c.ms.get), c
        assert c.nonzeros <= c.weights
    assert any(set(c.ms) > {"dense"} for c in tuning.layers)  # sparse candidates were timed
    forced = {c.name: next((i for i in ("csr", "strided") if i in c.ms), c.impl) for c in tuning.layers}
    tuned = apply(copy.deepcopy(deployed), forced)
    with torch.inference_mode():
        for m in (apply(copy.deepcopy(deployed), tuning.choices()), tuned):
            got = m(x)
            assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
            assert torch.equal(got.argmax(1), ref.argmax(1))
    with pytest.raises(ValueError, match="has no implementation 'bogus'"):
        apply(copy.deepcopy(deployed), {tuning.layers[0].name: "bogus"})


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 9), (1, 5, 2, 2)])
def test_strided_max_pool_is_max_pool(shape):
    from elastictrain.runtime.layers import MaxPool2x2, is_plain_2x2_pool

    x = torch.randn(*shape)
    assert torch.equal(MaxPool2x2()(x), F.max_pool2d(x, 2))
    assert is_plain_2x2_pool(nn.MaxPool2d(2)) and is_plain_2x2_pool(nn.MaxPool2d((2, 2), 2))
    assert not is_plain_2x2_pool(nn.MaxPool2d(2, ceil_mode=True)) and not is_plain_2x2_pool(nn.MaxPool2d(3, 2))


def test_gather_of_an_all_zero_conv_is_its_bias():
    conv = sparse_conv(3, 4, 3, 1, 1, True, "dense")
    with torch.no_grad():
        conv.weight.zero_()
    x = torch.randn(2, 3, 5, 5)
    with torch.inference_mode():
        assert torch.allclose(GatherConv2d(conv)(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_a_runtime_model_exports_to_pt2_and_loads_back(tmp_path):
    """CSR layers are operators (``torch.ops.elastictrain.*``), so ``torch.export`` keeps them: the
    .pt2 holds the compact arrays, runs at another batch size, and gives the same logits."""
    from elastictrain.deploy.export import Deployed, export_pt2

    model = nn.Sequential(sparse_conv(1, 32, 3, 1, 1, True, "pattern"), nn.ReLU(), nn.MaxPool2d(2),
                          sparse_conv(32, 64, 3, 2, 1, False, "unstructured"), nn.Flatten(), nn.Linear(64 * 4 * 4, 10))
    with torch.no_grad():
        model[5].weight.mul_((torch.rand(model[5].weight.shape) < 0.1).float())
    model.eval()
    choices = {"0": "csr", "3": "csr", "5": "csr"}
    rt = apply(copy.deepcopy(model), choices)
    assert [type(rt[i]).__name__ for i in (0, 3, 5)] == ["CSRConv2d", "CSRConv2d", "CSRLinear"]
    info = export_pt2(rt, torch.randn(2, 1, 16, 16), tmp_path / "m.runtime.pt2")
    ep = torch.export.load(str(tmp_path / "m.runtime.pt2"))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"elastictrain.csr_conv.default", "elastictrain.csr_linear.default"} <= targets
    assert not any("convolution" in t or t.startswith("aten.linear") for t in targets)  # nothing dense left
    loaded = Deployed(tmp_path / "m.runtime.pt2")
    x = torch.randn(5, 1, 16, 16)
    with torch.inference_mode():
        assert (loaded(x) - model(x)).abs().max().item() <= 1e-5
    dense = export_pt2(model, torch.randn(2, 1, 16, 16), tmp_path / "m.pt2")
    assert info["bytes"] < dense["bytes"] - 0.8 * 4 * sum(p.numel() for p in model.parameters())  # sparse inside


@pytest.mark.parametrize("levels,density,dtype", [(4 * 16, 0.3, torch.uint8), (300, 0.9, torch.int16)])
def test_codebook_layers_are_held_as_codes_and_folded_batchnorm_as_a_scale(levels, density, dtype):
    """A conv whose non-zeros take few values (a codebook layer) is held as codes + one table, with
    the BatchNorm folded into it applied per filter after the sum: same output as the folded conv,
    fewer bytes than fp32 values."""
    from elastictrain.deploy.export import fold_batchnorm

    g = torch.Generator().manual_seed(4)
    conv = sparse_conv(16, 32, 3, 1, 1, False, "unstructured")
    table = torch.randn(levels, generator=g)
    with torch.no_grad():
        conv.weight.copy_(torch.where(torch.rand(conv.weight.shape, generator=g) < density,
                                      table[torch.randint(0, levels, conv.weight.shape, generator=g)], 0.0))
    bn = nn.BatchNorm2d(32).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(0, 0.3, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.running_mean.normal_(0, 0.3, generator=g)
    model = fold_batchnorm(nn.Sequential(conv, bn))
    folded = model.get_submodule("0")
    x = torch.randn(4, 16, 9, 9)
    m = CSRConv2d(folded)
    assert m.codes is not None and m.codes.dtype == dtype and m.val is None and m.scale is not None
    assert len(m.table) <= levels
    with torch.inference_mode():
        ref = model(x)
        assert (m(x) - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    fp32 = CSRConv2d(sparse_conv(16, 32, 3, 1, 1, False, "unstructured"))  # continuous values: fp32 kept
    assert fp32.codes is None and fp32.val is not None
    nnz = m.col.numel()
    assert m.weight_bytes() < nnz * (2 + 4)  # fewer than int16 columns + fp32 values
