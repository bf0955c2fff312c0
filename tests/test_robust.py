"""elastictrain.train.attacks: attacks stay in the ε-ball and the image range, ascend the loss, leave the
parameters' gradients (and the constrainer's hooks) alone; adversarial training buys PGD accuracy."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from elastictrain import checkpoint
from elastictrain.constraints.plan import resolve
from elastictrain.constraints.spec import parse
from elastictrain.data import load as load_data
from elastictrain.data import make_loaders
from elastictrain.models import build_model
from elastictrain.train import Constrainer, EnforceConfig
from elastictrain.train.attacks import AdversarialConfig, AttackConfig, attack, parse_attacks, robust_accuracy

MEAN, STD = (0.3, 0.5), (0.2, 0.25)
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 5))
    x_pix = torch.rand(16, 2, 8, 8)
    m, s = torch.tensor(MEAN).view(1, 2, 1, 1), torch.tensor(STD).view(1, 2, 1, 1)
    return model, (x_pix - m) / s, torch.randint(0, 5, (16,)), x_pix, m, s


@pytest.mark.parametrize("cfg", [AttackConfig(kind="fgsm"), AttackConfig(kind="pgd", steps=5),
                                 AttackConfig(kind="pgd", steps=3, eps=0.1, alpha=0.05, random_start=False)],
                         ids=["fgsm", "pgd-5", "pgd-3-no-start"])
def test_attack_stays_in_ball_and_range_and_ascends(cfg):
    model, x, y, x_pix, m, s = _setup()
    model.train()
    x_adv = attack(model, x, y, cfg, MEAN, STD)
    adv_pix = x_adv * s + m
    assert float((adv_pix - x_pix).abs().max()) <= cfg.eps + 1e-6
    assert float(adv_pix.min()) >= -1e-6 and float(adv_pix.max()) <= 1 + 1e-6
    assert model.training  # the previous mode is restored
    model.eval()
    with torch.no_grad():
        assert nn.functional.cross_entropy(model(x_adv), y) > nn.functional.cross_entropy(model(x), y)


def test_fgsm_is_one_signed_step_of_eps():
    model, x, y, x_pix, m, s = _setup(1)
    cfg = AttackConfig(kind="fgsm", eps=0.05)
    model.eval()
    delta = x_pix.clone().requires_grad_(True)
    g, = torch.autograd.grad(nn.functional.cross_entropy(model((delta - m) / s), y), delta)
    expect = (x_pix + cfg.eps * g.sign()).clamp(0, 1)
    got = attack(model, x, y, cfg, MEAN, STD) * s + m
    assert torch.allclose(got, expect, atol=1e-6)


def test_attack_leaves_parameter_gradients_and_constrainer_hooks_alone():
    model, x, y, *_ = _setup(2)
    params = dict(model.named_parameters())
    plans = resolve(parse({"rules": [{"match": "0.weight", "prune": {"ratio": 2}}]}),
                    {n: tuple(p.shape) for n, p in params.items()})
    c = Constrainer(params, plans, EnforceConfig(method="fixed"), 10)
    c.begin()
    calls = []
    c._grad_hook = lambda *a: calls.append(1) or a[-1]  # count hook calls (the real one is bound at begin)
    attack(model, x, y, AttackConfig(steps=3), MEAN, STD)
    assert all(p.grad is None for p in model.parameters())
    assert calls == []


def test_parse_attacks():
    assert [a.name for a in parse_attacks("fgsm, pgd,pgd-20")] == ["fgsm", "pgd-7", "pgd-20"]
    with pytest.raises(ValueError, match="--attacks: unknown attack 'cw'"):
        parse_attacks("fgsm,cw")


@pytest.mark.parametrize("field,value,message", [("beta", 0.0, "beta: must be in (0, 1]"),
                                                 ("beta", 1.5, "beta: must be in (0, 1]"),
                                                 ("eval_images", -1, "eval_images: must be >= 0")])
def test_adversarial_config_errors(field, value, message):
    from elastictrain.config import ConfigError, build

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
        build(AdversarialConfig, {field: value})


@pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_adversarial_training_buys_pgd_accuracy(tmp_path):
    """Same data, model, seed and epochs; one pipeline trains with FGSM examples (beta 0.5): its
    PGD-7 accuracy is far above the clean-trained model's. ε = 0.1, the usual Fashion-MNIST radius
    (at 8/255 a 2-epoch SmallCNN is already fairly robust: the gap is too small to test on)."""
    from pipeline.config import load_cluster, load_pipeline
    from pipeline.runner import run_pipeline

    PGD = AttackConfig(kind="pgd", steps=7, eps=0.1, alpha=0.025)
    root = Path(__file__).resolve().parents[1]
    data = {"name": "fashion-mnist", "batch_size": 100, "limit_train": 4000, "limit_test": 500}
    out = {}
    for name, adv in (("clean", None),
                      ("robust", {"beta": 0.5, "attack": {"kind": "fgsm", "eps": 0.1}, "eval_images": 500})):
        stage = {"name": "dense_pretrain", "epochs": 2, "optimizer": {"lr": 0.05}}
        if adv:
            stage["adversarial"] = adv
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "seed": 0, "model": {"name": "smallcnn"}, "data": data,
                                        "stages": [stage]}))
        cfg = load_pipeline(path)
        rep = run_pipeline(cfg, load_cluster(root / "configs/clusters/single.yaml"), tmp_path / name,
                           log=lambda s: None)[0]
        b = load_data(cfg.data)
        model = build_model("smallcnn", num_classes=10, in_channels=1)
        model.load_state_dict(checkpoint.model_state(
            checkpoint.load(tmp_path / name / "dense_pretrain" / "checkpoint.pt")))
        _, test = make_loaders(b, cfg.data, torch.device("cpu"), seed=0)
        out[name] = (rep, robust_accuracy(model, test, PGD, b.mean, b.std)["accuracy"])
    (clean_rep, clean_pgd), (robust_rep, robust_pgd) = out["clean"], out["robust"]
    assert clean_rep["robust"] == {} and set(robust_rep["robust"]) == {"fgsm"}
    print(f"PGD-7 (eps 0.1): clean-trained {clean_pgd:.3f}, adversarially trained {robust_pgd:.3f}")
    assert robust_pgd > clean_pgd + 0.15, (clean_pgd, robust_pgd)
    assert robust_rep["top1"] > 0.6
