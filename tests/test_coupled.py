"""Coupled filter pruning (``prune: {unit: filter, coupled: true}``) on real zoo models: the groups
come from the traced graph, each is kept or pruned whole by its summed filter scores, the
BatchNorm entries of pruned channels are zeroed with them, and ``deploy.shrink`` then removes every
pruned channel — one-shot, while training, and through a pipeline stage and its checkpoint."""
from __future__ import annotations

import bn_stats
import pytest
import torch
import yaml
from test_pipeline import FMNIST, SINGLE
from torch import nn

from elastictrain import checkpoint
from elastictrain.compress import compress_state_dict
from elastictrain.config import ConfigError
from elastictrain.constraints.plan import resolve
from elastictrain.constraints.spec import parse
from elastictrain.constraints.topk import keep_count
from elastictrain.constraints.verify import verify
from elastictrain.deploy import coupling, shrink
from elastictrain.models import build_model
from elastictrain.train.constrainer import Constrainer, EnforceConfig
from elastictrain.train.layout import Sharded
from pipeline.cli import main
from pipeline.config import load_cluster, load_pipeline
from pipeline.runner import run_pipeline, validate

RATIO = 4


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def coupled_spec(classifier: str, *extra: dict):
    return parse({"rules": [{"match": classifier}, *extra,
                            {"match": "*", "prune": {"unit": "filter", "ratio": RATIO, "coupled": True}}]})


def randomize_bn(model: nn.Module, seed: int) -> None:
    """Trained-looking BatchNorm: a zero filter's channel then carries a non-zero constant (its
    shift) unless the follower masking zeroes it — so shrink could not remove it."""
    bn_stats.randomize_bn(model, torch.Generator().manual_seed(seed))


def dead_filters(w: torch.Tensor) -> torch.Tensor:
    return (w.detach().flatten(1) == 0).all(1)


def shapes_of(model: nn.Module) -> dict:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def active(cp, plans: dict) -> dict:
    """The followers a stage masks: those whose weights are all planned (``pipeline.stage.followers_for``)."""
    return {f: ws for f, ws in cp.followers.items() if all(w in plans for w in ws)}


def check_removable(model: nn.Module, cp, followers: dict, x: torch.Tensor) -> None:
    """Every channel of every coupled group is kept or pruned in all members, the followers of a
    pruned channel are 0, and shrink removes every pruned channel: no zero filter stays, each member
    keeps exactly its group's kept channels, and the logits match."""
    params = dict(model.named_parameters())
    for group in cp.groups:
        dead = [dead_filters(params[w]) for w in group]
        assert all(torch.equal(dead[0], d) for d in dead), group
        assert int((~dead[0]).sum()) == keep_count(len(dead[0]), RATIO)
    assert len(followers) > 2 * len(cp.groups)
    for f, ws in followers.items():
        gone = torch.stack([dead_filters(params[w]) for w in ws]).all(0)
        assert gone.any(), f
        assert bool((params[f].detach()[gone] == 0).all()), f
    small, report = shrink(model, x[:1])
    assert [(k.layer, k.role, k.channel, k.cause) for layer in report.layers for k in layer.kept] == []
    for name, p in params.items():
        if p.dim() == 4:
            alive = int((~dead_filters(p)).sum())
            assert small.get_submodule(name.rsplit(".", 1)[0]).weight.shape[0] == alive, name
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max().item() <= 1e-4
    assert report.mac_ratio > RATIO


def apply_with_constrainer(model: nn.Module, plans: dict, cp) -> Constrainer:
    """Project and mask as a training stage does: weights, then their followers."""
    c = Constrainer(dict(model.named_parameters()), plans, EnforceConfig(method="fixed"), 1,
                    followers=active(cp, plans))
    c.begin()
    return c


@pytest.mark.parametrize("name,classifier", [("resnet20", "fc.weight"), ("mobilenetv2", "classifier.weight")])
def test_one_shot_groups_go_whole_and_shrink_removes_them(name, classifier):
    torch.manual_seed(0)
    model = build_model(name, 10, 3).eval()
    randomize_bn(model, 1)
    x = torch.randn(3, 3, 32, 32)
    cp = coupling(model, x[:1])
    spec = coupled_spec(classifier)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = compress_state_dict(dict(model.state_dict()), spec, couplings=cp.groups)
    assert result.violations == []
    # each group keeps the channels with the largest summed squared filter norms (hand reference)
    for group in cp.groups:
        score = sum(original[w].flatten(1).pow(2).sum(1) for w in group)
        k = keep_count(len(score), RATIO)
        want = set(score.topk(k).indices.tolist())
        for w in group:
            assert set((~dead_filters(result.state_dict[w])).nonzero().flatten().tolist()) == want, w
    if name == "mobilenetv2":  # a depthwise conv is pruned with its producer
        dw = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
        tied = [g for g in cp.groups if any(w.rsplit(".", 1)[0] in dw for w in g)]
        assert len(tied) == 17 and all(len(g) == 2 for g in tied)
    c = apply_with_constrainer(model, result.plans, cp)
    for n, st in result.states.items():  # the stage's projection is the one-shot projection
        assert torch.equal(c.masks[n], st.mask), n
        assert torch.equal(dict(model.named_parameters())[n].detach(), result.state_dict[n]), n
    check_removable(model, cp, active(cp, result.plans), x)


def test_without_follower_masking_the_batchnorm_shift_keeps_channels():
    """The reason for followers: the same coupled masks with BatchNorm left as trained are not removable."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3).eval()
    randomize_bn(model, 1)
    x = torch.randn(1, 3, 32, 32)
    cp = coupling(model, x)
    result = compress_state_dict(dict(model.state_dict()), coupled_spec("fc.weight"), couplings=cp.groups)
    model.load_state_dict(result.state_dict)
    _, report = shrink(model, x)
    causes = {k.cause for layer in report.layers for k in layer.kept}
    assert any(c.startswith("a non-zero constant reaches zero-padded") for c in causes), causes


def test_training_steps_keep_pruned_channels_exactly_zero():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3)
    randomize_bn(model, 2)
    cp = coupling(model, torch.zeros(1, 3, 16, 16))
    plans = resolve(coupled_spec("fc.weight"), shapes_of(model), couplings=cp.groups)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    params = dict(model.named_parameters())
    followers = active(cp, plans)
    assert "layer1.0.bn2.bias" in followers and "fc.bias" not in followers  # fc is exempt
    c = Constrainer(params, plans, EnforceConfig(method="fixed"), 3, followers=followers)
    c.begin(opt)
    masks = {f: m for f, _, m in c.masked() if f in followers}
    for _ in range(3):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        nn.functional.cross_entropy(model(x), y).backward()
        c.after_backward()
        for f, m in masks.items():
            assert bool((params[f].grad[~m] == 0).all()), f
        opt.step()
        opt.zero_grad()
        c.after_step()
        for f, m in masks.items():
            assert bool((params[f].detach()[~m] == 0).all()) and bool((params[f].detach()[m] != 0).any()), f
    c.finish()
    model.eval()
    check_removable(model, cp, followers, torch.randn(2, 3, 16, 16))


def test_an_exempt_group_member_is_a_one_line_error_naming_the_group():
    model = build_model("resnet20", 10, 3)
    cp = coupling(model, torch.zeros(1, 3, 32, 32))
    spec = coupled_spec("fc.weight", {"match": "conv1.weight"})
    with pytest.raises(ConfigError) as e:
        resolve(spec, shapes_of(model), "spec.yaml", couplings=cp.groups)
    msg = str(e.value)
    assert msg.startswith("spec.yaml: rules[2].prune.coupled: layer1.0.conv2.weight shares its output channels")
    assert ("all of conv1.weight, layer1.0.conv2.weight, layer1.1.conv2.weight, layer1.2.conv2.weight; "
            "conv1.weight is exempt (rules[1] has no constraint)") in msg
    other = coupled_spec("fc.weight", {"match": "layer2.1.conv2.weight", "prune": {"unit": "kernel", "ratio": 2}})
    with pytest.raises(ConfigError, match=r"layer2\.1\.conv2\.weight has no coupled filter step \(rules\[1\]\)"):
        resolve(other, shapes_of(model), couplings=cp.groups)


@pytest.mark.parametrize("prune, message", [
    ({"unit": "kernel", "ratio": 4, "coupled": True}, "rules[0].prune.coupled: couples layers' output channels, "
                                                      "so it needs unit: filter (got kernel)"),
    ({"unit": "filter", "ratio": 4, "coupled": True, "scope": "global"}, "rules[0].prune.coupled: a coupled group"),
])
def test_coupled_needs_filter_units(prune, message):
    with pytest.raises(ConfigError) as e:
        parse({"rules": [{"match": "*", "prune": prune}]}, "spec.yaml")
    assert str(e.value).startswith(f"spec.yaml: {message}")


def test_pipeline_refuses_bad_coupling_before_training(tmp_path):
    path = tmp_path / "p.yaml"
    cfg = pipeline_cfg(coupled_spec_plain(exempt=["fc.weight", "conv1.weight"]))
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.spec: rules\[2\]\.prune\.coupled: .*conv1\.weight is exempt"):
        validate(load_pipeline(path), 10, 1, image_size=28)
    path.write_text(yaml.safe_dump(pipeline_cfg(coupled_spec_plain())))
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.spec: prune\.coupled: coupled filter pruning needs "
                                          r"deepspeed\.zero_stage 0–2"):
        validate(load_pipeline(path), 10, 1, sharded=True, image_size=28)
    model = build_model("resnet20", 10, 1)  # and the constrainer itself, should a caller skip validate
    cp = coupling(model, torch.zeros(1, 1, 28, 28))
    plans = resolve(coupled_spec("fc.weight"), shapes_of(model), couplings=cp.groups)
    c = Constrainer(dict(model.named_parameters()), plans, EnforceConfig(method="fixed"), 1,
                    followers={"bn1.weight": ["conv1.weight"]})
    with pytest.raises(ValueError, match="coupled filter pruning needs ZeRO 0–2"):
        c.use_layout(Sharded(lambda n: None))


def test_without_coupled_nothing_changes():
    model = build_model("resnet20", 10, 3)
    cp = coupling(model, torch.zeros(1, 3, 32, 32))
    plain = parse({"rules": [{"match": "fc.weight"}, {"match": "*", "prune": {"unit": "filter", "ratio": RATIO}}]})
    a, b = resolve(plain, shapes_of(model)), resolve(plain, shapes_of(model), couplings=cp.groups)
    assert a == b and all(s.scope == "layer" for p in a.values() for s in p.steps)
    # filters pruned per layer: a residual group's members disagree, and verify sees the coupled spec broken
    sd = compress_state_dict(dict(model.state_dict()), plain).state_dict
    group = cp.groups[0]
    assert not all(torch.equal(dead_filters(sd[group[0]]), dead_filters(sd[w])) for w in group)
    coupled = resolve(coupled_spec("fc.weight"), shapes_of(model), couplings=cp.groups)
    bad = [v for v in verify(coupled, sd) if "prune.coupled" in v.field]
    assert bad and bad[0].field == "prune.coupled (the group of conv1.weight)"


def coupled_spec_plain(exempt=("fc.weight",)) -> dict:
    return {"rules": [{"match": n} for n in exempt]
            + [{"match": "*", "prune": {"unit": "filter", "ratio": RATIO, "coupled": True}}]}


def pipeline_cfg(spec: dict) -> dict:
    return {"name": "coupled", "seed": 0, "model": {"name": "resnet20"},
            "data": {"name": "fashion-mnist", "batch_size": 64, "limit_train": 512, "limit_test": 256},
            "stages": [{"name": "dense_pretrain", "epochs": 1, "optimizer": {"lr": 0.05}},
                       {"name": "progressive_prune", "epochs": 1, "spec": spec, "optimizer": {"lr": 0.02},
                        "enforce": {"method": "progressive", "update_every": 2, "end": 0.5}}]}


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing")
def test_a_coupled_prune_stage_trains_to_a_removable_model(tmp_path, capsys):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline_cfg(coupled_spec_plain())))
    reports = run_pipeline(load_pipeline(path), load_cluster(SINGLE), tmp_path / "out", log=lambda s: None)
    assert reports[1]["constraint_stats"]["mask_updates"] >= 3  # progressive: masks moved during the stage
    ckpt = checkpoint.load(tmp_path / "out" / "progressive_prune" / "checkpoint.pt")
    model = build_model("resnet20", 10, 1)
    model.load_state_dict(checkpoint.model_state(ckpt))
    model.eval()
    cp = coupling(model, torch.zeros(1, 1, 28, 28))
    assert ckpt["couplings"] == cp.groups  # plain lists of names, for checkpoint.plans
    rebuilt = checkpoint.plans(ckpt)
    assert rebuilt == resolve(coupled_spec("fc.weight"), shapes_of(model), couplings=cp.groups)
    assert {s.pool for p in rebuilt.values() for s in p.steps if s.pool[1] == "conv1.weight"} == {
        ("coupled", "conv1.weight")}
    assert verify(rebuilt, checkpoint.model_state(ckpt)) == []
    # the BatchNorm of every pruned channel is exactly 0 in the file (checked on the loaded model)
    check_removable(model, cp, active(cp, rebuilt), torch.randn(4, 1, 28, 28))
    # the command line verifies with the recorded groups, and refuses one-shot coupled compression
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(coupled_spec_plain()))
    ckpt_file = str(tmp_path / "out" / "progressive_prune" / "checkpoint.pt")
    assert main(["verify", ckpt_file, "--spec", str(spec_file)]) == 0
    assert main(["compress", ckpt_file, "--spec", str(spec_file), "--out", str(tmp_path / "c.pt")]) == 2
    assert "use it in a pipeline stage" in capsys.readouterr().err


def _zero2_worker(rank: int, world: int):
    """ZeRO-2 on two gloo ranks: a coupled progressive stage; DeepSpeed's fp32 master fragments and
    momentum of pruned BatchNorm entries must be re-masked with the weights' (``remask_master``)."""
    import os

    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    import deepspeed  # noqa: F401  (DeepSpeed's accelerator set up before the model is built)

    from elastictrain.train import Hooks, LRConfig, OptimConfig, build_optimizer, build_scheduler, train_epoch
    from jobs.backend import DeepSpeedBackend
    from jobs.cluster import DeepSpeedConfig

    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1)
    cp = coupling(model, torch.zeros(1, 1, 16, 16))
    plans = resolve(coupled_spec("fc.weight"), shapes_of(model), couplings=cp.groups)
    opt = build_optimizer(model, OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4))
    sched = build_scheduler(opt, LRConfig(name="constant"), 8, 1)
    c = Constrainer(dict(model.named_parameters()), plans, EnforceConfig(method="progressive", update_every=2, end=0.5),
                    8, followers=active(cp, plans))
    backend = DeepSpeedBackend(DeepSpeedConfig(zero_stage=2), rank, world, torch.device("cpu"))
    engine, stepper = backend.engine(model, opt, sched, c, batch_per_rank=8, clip=None)
    for event in c.begin(opt):
        backend.after_update(c, event)
    g = torch.Generator().manual_seed(5 + rank)
    batches = [(torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(8)]
    train_epoch(engine, batches, stepper, c, Hooks(on_update=lambda e: backend.after_update(c, e)))
    revived, pruned = 0, 0
    for f, p, mask in c.masked():
        if f not in c.followers:
            continue
        pruned += int((~mask).sum())
        revived += int((p.detach()[~mask] != 0).sum())
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:  # this rank's fragment of the fp32 master copy and of the momentum
            addr = mapping.lp_fragment_address
            gone = ~mask.reshape(-1).narrow(0, addr.start, addr.numel)
            revived += int((mapping.get_hp_fragment()[gone] != 0).sum())
            revived += sum(int((s[gone] != 0).sum()) for s in (mapping.optim_fragment or {}).values()
                           if isinstance(s, torch.Tensor) and s.numel() == addr.numel)
    c.finish()
    return {"checksum": c.checksum(), "pruned": pruned, "revived": revived,
            "violations": [str(v) for v in verify(plans, {n: p.detach() for n, p in c.params.items()})]}


def test_zero2_remasks_followers_in_deepspeed_master_copies(tmp_path):
    pytest.importorskip("deepspeed")
    from test_dist import run2

    r0, r1 = run2(tmp_path, _zero2_worker)
    assert r0["checksum"] == r1["checksum"]
    for r in (r0, r1):
        assert r["pruned"] > 0 and r["revived"] == 0 and r["violations"] == []
