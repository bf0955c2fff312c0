"""``deploy.shrink`` on real zoo models: zeroed filters leave the network physically, the logits stay.

Each case zeroes filters the way a filter-pruned model has them (weights zero, bias and BatchNorm
left as trained), randomizes BatchNorm statistics and *pins* the constant a zeroed channel carries
after its BatchNorm, so the test knows, from its own construction and the architecture, which
channels must go: a constant ≤ 0 becomes 0 after ReLU and may meet a zero-padded conv; a positive
one may not (the border would change) unless a linear or unpadded 1×1 conv reads it. From that it
recounts parameters and MACs and slices the original weights itself, independently of
``elastictrain.deploy``, and compares.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from bn_stats import randomize_bn
from torch import nn

from elastictrain.deploy import UntraceableModel, channel_groups, shrink
from elastictrain.models import build_model

TOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def zero(conv: nn.Module, ks, bn: nn.BatchNorm2d | None = None, const: float | None = None) -> None:
    """Zero filters ``ks`` (bias untouched); with ``bn``, make BN output ``const`` on them."""
    with torch.no_grad():
        conv.weight[list(ks)] = 0
        if bn is not None:
            for k in ks:
                pre = conv.bias[k] if conv.bias is not None else 0.0
                scale = bn.weight[k] / torch.sqrt(bn.running_var[k] + bn.eps)
                bn.bias[k] = const - (pre - bn.running_mean[k]) * scale


def keep_all_but(n: int, gone) -> torch.Tensor:
    gone = set(int(k) for k in gone)
    return torch.tensor([k for k in range(n) if k not in gone], dtype=torch.long)


class Expected:
    """Per layer, the output channels and input features that must remain; the recount of what that leaves."""

    def __init__(self, model: nn.Module):
        self.model, self.layers, self.bns = model, {}, {}

    def layer(self, name: str, out: torch.Tensor, inp: torch.Tensor) -> None:
        self.layers[name] = (out, inp)

    def bn(self, name: str, keep: torch.Tensor) -> None:
        self.bns[name] = keep

    def check(self, small: nn.Module, report, x: torch.Tensor) -> None:
        model = self.model
        mods = dict(model.named_modules())
        spatial = {}  # output H*W of every conv, from hooks on the original model
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: spatial.__setitem__(n, o[0, 0].numel()))
                 for n, m in mods.items() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            ref = model(x)
            got = small(x)
        for h in hooks:
            h.remove()
        assert (got - ref).abs().max().item() <= TOL
        assert set(self.layers) | set(self.bns) == {n for n, m in mods.items() if isinstance(
            m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))}, "the test must say what becomes of every layer"
        params = macs = 0
        for name, (out, inp) in self.layers.items():
            old, new = mods[name], small.get_submodule(name)
            depthwise = isinstance(old, nn.Conv2d) and old.groups > 1
            want = old.weight.detach()[out] if depthwise else old.weight.detach()[out][:, inp]
            assert new.weight.shape == want.shape, name
            assert torch.equal(new.weight, want), name  # these very channels, copied exactly
            assert tuple(report.layer(name).shape_after) == tuple(want.shape)
            params += want.numel() + (len(out) if old.bias is not None else 0)
            macs += want.numel() * spatial.get(name, 1)
        for name, keep in self.bns.items():
            new = small.get_submodule(name)
            assert torch.equal(new.running_var, mods[name].running_var[keep]), name
            params += 2 * len(keep)
        assert sum(p.numel() for p in small.parameters()) == params == report.params_after
        assert report.params_before == sum(p.numel() for p in model.parameters())
        assert report.macs_after == macs
        assert all(type(m).__module__.startswith("torch.") for m in small.modules())


def chain_case(name: str, in_channels: int, hw: int, seed: int = 0):
    """VGG-like stacks (``features`` = conv, BN, ReLU [, pool] …, then linear layers)."""
    gen = torch.Generator().manual_seed(seed)
    model = build_model(name, 10, in_channels).eval()
    randomize_bn(model, gen)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    gone = []
    for i, ((_, conv), (_, bn)) in enumerate(zip(convs, bns)):
        ks = torch.randperm(conv.out_channels, generator=gen)[: conv.out_channels // 2].tolist()
        hot = ks[: max(1, len(ks) // 5)]  # these carry a positive constant after ReLU
        zero(conv, [k for k in ks if k not in hot], bn, -0.5)
        zero(conv, hot, bn, 0.5)
        last = i == len(convs) - 1  # read by a linear layer (through pool / flatten): any constant folds
        gone.append(set(ks) if last else set(ks) - set(hot))
    # A channel every filter of the next conv dropped goes too, though its own filter is not zero.
    orphan = next(k for k in range(convs[0][1].out_channels) if k not in gone[0] and k not in gone[1])
    with torch.no_grad():
        convs[1][1].weight[:, orphan] = 0
    gone[0].add(orphan)
    exp = Expected(model)
    inp = torch.arange(in_channels)
    for (n, conv), (bn_name, _), g in zip(convs, bns, gone):
        out = keep_all_but(conv.out_channels, g)
        exp.layer(n, out, inp)
        exp.bn(bn_name, out)
        inp = out
    x = torch.randn(1, in_channels, hw, hw)
    with torch.no_grad():
        flat = model.features(x).shape[1] // convs[-1][1].out_channels  # H*W per channel at the flatten
    feats = (inp[:, None] * flat + torch.arange(flat)).flatten()
    for j, (n, lin) in enumerate(linears):
        out = torch.arange(lin.out_features)
        if j < len(linears) - 1:  # hidden linear layers: zero rows go (the next linear folds the bias)
            rows = torch.randperm(lin.out_features, generator=gen)[: lin.out_features // 2]
            zero(lin, rows.tolist())
            out = keep_all_but(lin.out_features, rows.tolist())
        exp.layer(n, out, feats)
        feats = out
    return model, exp, x


@pytest.mark.parametrize("name,in_channels,hw", [("vgg16", 3, 32), ("vggcpu", 1, 28), ("smallcnn", 1, 28)])
def test_chain_models_shrink_exactly(name, in_channels, hw):
    model, exp, x = chain_case(name, in_channels, hw)
    small, report = shrink(model, x)
    exp.check(small, report, torch.randn(3, in_channels, hw, hw))
    assert report.mac_ratio > 1.5 and report.param_ratio > 1.5
    assert json.loads(json.dumps(report.to_dict()))["params_after"] == report.params_after
    # the positive constants that met a padded conv stay, and say so
    causes = {k.cause for l in report.layers for k in l.kept}
    assert any(c.startswith("a non-zero constant reaches zero-padded") for c in causes), causes


def resnet_case(arch: str = "resnet20", seed: int = 1):
    """CIFAR ResNets: per stage, half the stream channels zeroed in every tensor summed into it (they go),
    two zeroed in one branch only (they stay); half of each block's inner channels zeroed."""
    gen = torch.Generator().manual_seed(seed)
    model = build_model(arch, 10, 3).eval()
    randomize_bn(model, gen)
    exp = Expected(model)
    one_branch, prev = [], torch.arange(3)  # (layer, zero filters that stay, a live layer they are summed with)
    for s, layer in enumerate([model.layer1, model.layer2, model.layer3]):
        name, planes = f"layer{s + 1}", layer[0].conv2.out_channels
        # what opens the stream: the stem for stage 1, the downsample projection after that
        head = ("conv1", "bn1") if s == 0 else (f"{name}.0.downsample.0", f"{name}.0.downsample.1")
        writers = [head] + [(f"{name}.{b}.conv2", f"{name}.{b}.bn2") for b in range(len(layer))]
        perm = torch.randperm(planes, generator=gen).tolist()
        coupled, single, partial = perm[: planes // 2], perm[planes // 2: planes // 2 + 2], perm[-1:]
        for conv, bn in writers:
            zero(model.get_submodule(conv), coupled, model.get_submodule(bn), -0.5)
        # zero in one branch only, and in all but the last: both stay
        zero(layer[1].conv2, single, layer[1].bn2, -0.5)
        for conv, bn in writers[:-1]:
            zero(model.get_submodule(conv), partial, model.get_submodule(bn), -0.5)
        one_branch += [(f"{name}.1.conv2", single, f"{name}.0.conv2"), (head[0], partial, writers[-1][0]),
                       (f"{name}.1.conv2", partial, writers[-1][0])]
        stream = keep_all_but(planes, coupled)
        exp.layer(head[0], stream, prev)
        exp.bn(head[1], stream)
        block_in = stream if s == 0 else prev  # stage 1's first block reads the stem's output
        for b, blk in enumerate(layer):
            ks = torch.randperm(planes, generator=gen)[: planes // 2].tolist()
            zero(blk.conv1, ks[2:], blk.bn1, -0.5)
            zero(blk.conv1, ks[:2], blk.bn1, 0.5)  # positive after ReLU, meets conv2's zero padding: stays
            inner = keep_all_but(planes, ks[2:])
            exp.layer(f"{name}.{b}.conv1", inner, block_in if b == 0 else stream)
            exp.bn(f"{name}.{b}.bn1", inner)
            exp.layer(f"{name}.{b}.conv2", stream, inner)
            exp.bn(f"{name}.{b}.bn2", stream)
        prev = stream
    exp.layer("fc", torch.arange(10), prev)
    return model, exp, one_branch


@pytest.mark.parametrize("arch", ["resnet20", "resnet56"])
def test_resnet_residual_groups_shrink_exactly(arch):
    model, exp, _ = resnet_case(arch)
    small, report = shrink(model, torch.randn(1, 3, 32, 32))
    exp.check(small, report, torch.randn(3, 3, 32, 32))
    assert report.layer("layer2.0.conv2").shape_after[0] < 32  # the coupled zero channels really went


def test_residual_channel_zero_in_one_branch_stays_and_is_explained():
    model, _, one_branch = resnet_case()
    small, report = shrink(model, torch.randn(1, 3, 32, 32))
    for layer, channels, live in one_branch:
        kept = {k.channel: k for k in report.layer(layer).kept if k.role == "filter"}
        assert set(channels) <= set(kept), layer
        for c in channels:
            assert kept[c].cause == "coupled through a residual sum with a non-zero filter"
            assert live in kept[c].detail  # names a layer whose filter is not zero
        assert small.get_submodule(layer).weight.shape[0] == report.layer(layer).shape_after[0]
    assert "coupled through a residual sum" in report.table()


def test_channel_groups_follow_the_graph():
    groups = channel_groups(build_model("resnet20"), torch.randn(1, 3, 32, 32))
    stream = next(g for g in groups if ("conv1", 0) in g.writes)
    assert sorted(n for n, _ in stream.writes) == ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    assert sorted(n for n, _, _ in stream.reads) == ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1",
                                                     "layer2.0.conv1", "layer2.0.downsample.0"]
    assert stream.fixed == [] and ("bn1", 0) in stream.passes
    last = next(g for g in groups if ("layer3.0.downsample.0", 0) in g.writes)
    assert ("fc", 0, 1) in last.reads and len(last.writes) == 4
    logits = next(g for g in groups if ("fc", 0) in g.writes)
    assert logits.fixed == ["reaches the model output"]
    mobile = channel_groups(build_model("mobilenetv2"), torch.randn(1, 3, 32, 32))
    stem = next(g for g in mobile if ("features.0.0", 0) in g.writes)  # depthwise: one group with its producer
    assert ("features.1.conv.0.0", 0) in stem.passes and [r[0] for r in stem.reads] == ["features.1.conv.1"]


def test_mobilenetv2_depthwise_and_inverted_residuals_shrink_exactly():
    gen = torch.Generator().manual_seed(2)
    model = build_model("mobilenetv2", 10, 3).eval()
    randomize_bn(model, gen)
    exp = Expected(model)
    feats = model.features
    # stem: its channels run through block 0's depthwise conv (zero-padded), so only a constant 0 goes
    ks = torch.randperm(32, generator=gen)[:10].tolist()
    zero(feats[0][0], ks[2:], feats[0][1], -0.5)
    zero(feats[0][0], ks[:2], feats[0][1], 0.5)
    stream = keep_all_but(32, ks[2:])
    exp.layer("features.0.0", stream, torch.arange(3))
    exp.bn("features.0.1", stream)
    # blocks, stage by stage: the projections of one stage are summed into one stream
    i = 1
    while i < len(feats) - 1:
        stage = [i]
        while i + len(stage) < len(feats) - 1 and feats[i + len(stage)].residual:
            stage.append(i + len(stage))
        projections = [feats[j].conv[-2] for j in stage]
        c_out = projections[0].out_channels
        perm = torch.randperm(c_out, generator=gen).tolist()
        coupled = perm[: c_out // 2]  # read only by unpadded 1×1 convs: any constant folds
        for p in projections:
            zero(p, coupled)
        if len(stage) > 1:
            zero(projections[-1], perm[c_out // 2: c_out // 2 + 1])  # one branch only: stays
        out_stream = keep_all_but(c_out, coupled)
        for j in stage:
            pre = f"features.{j}.conv"
            blk = feats[j].conv
            if len(blk) == 4:  # expand 1×1, depthwise 3×3, project 1×1
                hidden = blk[0][0].out_channels
                ks = torch.randperm(hidden, generator=gen)[: hidden // 2].tolist()
                zero(blk[0][0], ks[3:], blk[0][1], -0.5)
                zero(blk[0][0], ks[:3], blk[0][1], 0.5)
                inner = keep_all_but(hidden, ks[3:])
                exp.layer(f"{pre}.0.0", inner, stream)
                exp.bn(f"{pre}.0.1", inner)
                dw = f"{pre}.1"
            else:  # t = 1: the depthwise conv works on the stream itself
                inner, dw = stream, f"{pre}.0"
            exp.layer(f"{dw}.0", inner, inner)
            exp.bn(f"{dw}.1", inner)
            exp.layer(f"{pre}.{len(blk) - 2}", out_stream, inner)
            exp.bn(f"{pre}.{len(blk) - 1}", out_stream)
            stream = out_stream
        i += len(stage)
    last = feats[-1]
    ks = torch.randperm(1280, generator=gen)[:640].tolist()
    zero(last[0], ks)  # constants reach the classifier through the pool: folded into its bias
    top = keep_all_but(1280, ks)
    exp.layer(f"features.{len(feats) - 1}.0", top, stream)
    exp.bn(f"features.{len(feats) - 1}.1", top)
    exp.layer("classifier", torch.arange(10), top)
    small, report = shrink(model, torch.randn(1, 3, 32, 32))
    exp.check(small, report, torch.randn(2, 3, 32, 32))
    causes = {k.cause for l in report.layers for k in l.kept}
    assert "coupled through a residual sum with a non-zero filter" in causes
    detail = [k.detail for k in report.layer("features.0.0").kept]
    assert len(detail) == 2 and all("depthwise" in d for d in detail), detail


class Branchy(nn.Module):
    """Concatenation, functional ops, ``view(n, -1)`` and batch-size reads: what the zoo does not have."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.mix = nn.Conv2d(14, 12, 1)
        self.head = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        y = torch.cat([F.relu(self.bn_a(self.a(x))), F.relu(self.bn_b(self.b(x)))], dim=1)
        y = F.max_pool2d(self.mix(y), 2).view(y.size(0), -1)
        return self.head(y.reshape(y.shape[0], -1))  # reads the batch size only, changes nothing


def test_concatenation_offsets_and_functional_ops(tmp_path):
    gen = torch.Generator().manual_seed(3)
    model = Branchy().eval()
    randomize_bn(model, gen)
    zero(model.a, [1, 5])  # non-zero constants: the unpadded 1×1 ``mix`` folds them into its bias
    zero(model.b, [0, 3])
    zero(model.mix, [2, 7])  # its bias is a constant through the pool: ``head`` folds it (16 features each)
    exp = Expected(model)
    a, b, mix = keep_all_but(8, [1, 5]), keep_all_but(6, [0, 3]), keep_all_but(12, [2, 7])
    exp.layer("a", a, torch.arange(3))
    exp.bn("bn_a", a)
    exp.layer("b", b, torch.arange(3))
    exp.bn("bn_b", b)
    exp.layer("mix", mix, torch.cat([a, 8 + b]))
    exp.layer("head", torch.arange(5), (mix[:, None] * 16 + torch.arange(16)).flatten())
    x = torch.randn(2, 3, 8, 8)
    small, report = shrink(model, x[:1])
    exp.check(small, report, x)
    # The shrunk model loads and runs in an interpreter that cannot import elastictrain.
    torch.save(small, tmp_path / "small.pt")
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys; sys.modules['elastictrain'] = None; import torch; torch.set_num_threads(1); "
            f"m = torch.load(r'{tmp_path / 'small.pt'}', weights_only=False); "
            f"torch.save(m(torch.load(r'{tmp_path / 'x.pt'}')), r'{tmp_path / 'y.pt'}')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    with torch.no_grad():
        assert (torch.load(tmp_path / "y.pt") - small(x)).abs().max().item() <= 1e-6


class Moody(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.conv(x)
        return -self.conv(x)


def test_untraceable_model_is_named():
    with pytest.raises(UntraceableModel, match="Moody"):
        shrink(Moody(), torch.randn(1, 3, 8, 8))


def test_input_that_does_not_fit_is_named():
    with pytest.raises(ValueError, match=r"\(1, 3, 28, 28\).*VGG"):
        shrink(build_model("vgg11"), torch.randn(1, 3, 28, 28))


def test_callers_model_is_untouched():
    model, _, x = chain_case("smallcnn", 1, 28, seed=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shrink(model, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("align", [8, 16])
def test_align_rounds_every_group_up_exactly_and_says_why(align):
    """``align``: the channels that could go are kept back until each group's width is a multiple of
    ``align`` (or whole); still exact, and each kept-back channel carries that reason."""
    model, _, x = chain_case("vgg11", 3, 32)
    plain, plain_report = shrink(model, x)
    small, report = shrink(model, x, align=align)
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max().item() <= TOL
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for (name, m), (reader, _) in zip(layers, layers[1:]):
        if isinstance(m, nn.Conv2d):
            width, before = small.get_submodule(name).out_channels, plain.get_submodule(name).out_channels
            assert width == min(m.out_channels, -(-before // align) * align), name  # the least multiple that fits
            # every kept-back channel says so: as a zero filter of this layer or a dropped input of its reader
            padded = {k.channel for n, role in ((name, "filter"), (reader, "input"))
                      for k in report.layer(n).kept if k.role == role and "align" in k.cause}
            assert len(padded) == width - before, name
    assert plain_report.macs_after < report.macs_after < report.macs_before


def test_align_must_be_positive():
    with pytest.raises(ValueError, match="align must be a positive integer"):
        shrink(build_model("smallcnn", 10, 1), torch.randn(1, 1, 28, 28), align=0)
