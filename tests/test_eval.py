"""``elastictrain eval``: the research release's checkpoint format, our own checkpoints with data
and attacks, plots, and refusal of a checkpoint that carries a pickled callable."""
from __future__ import annotations

import json
import pathlib
from pathlib import Path

import pytest
import torch

from elastictrain import checkpoint
from elastictrain.compress import compress_state_dict
from elastictrain.constraints.spec import load as load_spec
from elastictrain.data import DataConfig
from elastictrain.data import load as load_data
from elastictrain.data.loader import make_test_loader
from elastictrain.models import build_model
from elastictrain.train import evaluate
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    """The research release's format, built from VGG16 at 1000× + 2-bit × 64 codebooks: no spec,
    no model name — only the weights (compression baked in), the buffers and the epoch."""
    torch.manual_seed(0)
    sd = build_model("vgg16").state_dict()
    c = compress_state_dict(sd, load_spec(ROOT / "configs/specs/vgg16-16000x-1000x-2bit-64cb.yaml"))
    masks = {n: s.mask for n, s in c.states.items()}
    ckpt = {"model_state_dict": c.state_dict,
            "elastic_trainer_state_dict": {"model_buffers_state_dict": {
                "weight_mask": masks, "pre_weight_mask": {n: torch.ones_like(m) for n, m in masks.items()},
                "structured_weight_mask": {}, "pre_structured_weight_mask": {},
                "quantization_table": {n: s.codebook for n, s in c.states.items()}}},
            "local_dict": {"epoch": 160}}
    path = tmp_path_factory.mktemp("seed") / "vgg16_16000x.pt"
    torch.save(ckpt, path)
    return path, c.state_dict


def test_seed_format_counts_match_an_independent_count(seed_checkpoint, tmp_path, capsys):
    path, sd = seed_checkpoint
    out = tmp_path / "eval.json"
    assert main(["eval", str(path), "--model", "vgg16", "--unit", "kernel", "--groups", "{filter: 16, channel: 4}",
                 "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    weights = {n: v for n, v in sd.items() if v.dim() in (2, 4)}
    assert rep["epoch"] == 160 and "top1" not in rep  # no data: compression statistics alone
    assert rep["total_params"] == sum(v.numel() for v in weights.values())
    assert rep["nonzeros"] == sum(int((v != 0).sum()) for v in weights.values())
    for layer in rep["layers"]:
        w = weights[layer["name"]]
        assert layer["params"] == w.numel() and layer["nonzeros"] == int((w != 0).sum())
        assert layer["unique_values"] == int(w[w != 0].unique().numel())
    assert 990 < rep["pruning_ratio"] < 1010
    assert 15_800 < rep["nominal_compression"] < 16_200  # 2-bit codes read off the tables' 4 columns
    assert rep["storage_compression"] < rep["nominal_compression"] / 5  # the honest ratio is far lower
    books = {c["name"]: c for c in rep["codebooks"]["layers"]}
    assert all(c["max_unique"] <= 4 for c in books.values() if not c.get("skipped"))
    # 3 channels: 4 parts do not divide
    assert "features.0.weight" in books and books["features.0.weight"].get("skipped")
    assert "nonzeros" in capsys.readouterr().out


def test_rename_maps_another_definitions_names(tmp_path):
    """A ResNet saved under the common CIFAR port's names (``shortcut``, ``linear``) reads with --rename."""
    torch.manual_seed(0)
    sd = build_model("resnet20").state_dict()
    theirs = {k.replace("downsample.", "shortcut.").replace("fc.", "linear."): v for k, v in sd.items()}
    assert theirs.keys() != sd.keys()
    path = tmp_path / "theirs.pt"
    torch.save({"model_state_dict": theirs, "local_dict": {"epoch": 1}}, path)
    assert main(["eval", str(path), "--model", "resnet20", "--data", "fashion-mnist", "--limit-test", "1"]) == 2
    out = tmp_path / "e.json"
    assert main(["eval", str(path), "--model", "resnet20", "--rename", "shortcut.=downsample.,linear.=fc.",
                 "--json", str(out)]) == 0
    assert {l["name"] for l in json.loads(out.read_text())["layers"]} == {k for k, v in sd.items() if v.dim() in (2, 4)}


def test_refuses_a_pickled_callable_without_running_it(tmp_path, capsys):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"w": torch.zeros(2, 2)}, "local_dict": {"epoch": Payload()}}, path)
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it …
    assert marker.exists()
    marker.unlink()
    assert main(["eval", str(path), "--model", "vgg16"]) == 2  # … ours refuses the file
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and "not a readable checkpoint" in err
    assert not marker.exists()


@pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_our_checkpoint_with_data_attacks_and_plots(tmp_path, capsys):
    ck = tmp_path / "init.pt"
    assert main(["init", "smallcnn", "--in-channels", "1", "--out", str(ck)]) == 0
    small = tmp_path / "small.pt"
    assert main(["compress", str(ck), "--spec", str(ROOT / "configs/specs/smallcnn-zero3-mixture.yaml"),
                 "--out", str(small), "--quiet"]) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", str(small), "--data", "fashion-mnist", "--limit-test", "300", "--attacks", "fgsm,pgd",
                 "--attack-images", "200", "--balance", "{filter: 16, channel: 4}", "--json", str(out),
                 "--plots", str(tmp_path / "plots")]) == 0
    rep = json.loads(out.read_text())
    # accuracy equals an independent evaluation of the same weights on the same images
    data = DataConfig(name="fashion-mnist", limit_test=300)
    model = build_model("smallcnn", num_classes=10, in_channels=1)
    model.load_state_dict(checkpoint.model_state(checkpoint.load(small)))
    test = make_test_loader(load_data(data), data, torch.device("cpu"))
    ref = evaluate(model, test)
    assert rep["top1"] == ref["top1"] and rep["top5"] == ref["top5"] and rep["test_images"] == 300
    assert set(rep["robust"]) == {"fgsm", "pgd-7"} and rep["robust_images"] == 200
    assert all(0 <= v <= 1 for v in rep["robust"].values())
    assert rep["robust"]["pgd-7"] <= rep["robust"]["fgsm"] + 0.05  # PGD-7 is at least as strong, up to noise
    bal = {b["name"]: b for b in rep["balance"]["layers"]}
    assert not bal["features.3.weight"].get("skipped") and bal["features.3.weight"]["equal"]  # balanced kernels
    for png in ("weights.png", "density.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the packed artifact: exported, then evaluated in place of the checkpoint — same figures
    etz = tmp_path / "small.etz"
    assert main(["export", str(small), "--out", str(etz)]) == 0
    assert "honest ratio" in capsys.readouterr().out
    out2 = tmp_path / "eval-etz.json"
    assert main(["eval", str(etz), "--data", "fashion-mnist", "--limit-test", "300", "--json", str(out2)]) == 0
    rep2 = json.loads(out2.read_text())
    assert (rep2["top1"], rep2["top5"], rep2["nonzeros"]) == (rep["top1"], rep["top5"], rep["nonzeros"])
    assert rep2["artifact_bytes"] == etz.stat().st_size == rep["artifact_bytes"]
    assert rep["honest_compression"] == pytest.approx(32 * rep["total_params"] / (8 * rep["artifact_weights_bytes"]))


def test_eval_errors_are_one_line(tmp_path, capsys, seed_checkpoint):
    path, _ = seed_checkpoint
    cases = [(["eval", str(tmp_path / "missing.pt")], "no such checkpoint"),
             (["eval", str(path), "--data", "fashion-mnist"], "records no model name; pass --model"),
             (["eval", str(path), "--model", "vgg16", "--attacks", "pgd"], "--attacks: needs --data"),
             (["eval", str(path), "--model", "vgg16", "--data", "fashion-mnist", "--attacks", "cw"],
              "--attacks: unknown attack 'cw'"),
             (["eval", str(path), "--model", "resnet20", "--data", "fashion-mnist"],
              "weights do not fit model 'resnet20'"),
             (["eval", str(path), "--groups", "{filtr: 4}"], "groups.filtr: unknown key")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
