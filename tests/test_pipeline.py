"""The staged pipeline end to end on the real Fashion-MNIST files (a small slice of them):
every stage's output satisfies its spec, reports match an independent recount, reruns skip."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from elastictrain import artifact, checkpoint
from elastictrain.config import ConfigError
from elastictrain.constraints.plan import resolve
from elastictrain.constraints.spec import parse
from elastictrain.constraints.verify import verify
from elastictrain.data import load as load_data
from elastictrain.data import make_loaders
from elastictrain.models import build_model
from elastictrain.train import evaluate
from pipeline.cli import main
from pipeline.config import load_cluster, load_pipeline
from pipeline.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
SINGLE = ROOT / "configs" / "clusters" / "single.yaml"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist "
                                       "(make test does it)")

PRUNE = {"rules": [{"match": "features.3.weight", "prune": {"unit": "kernel", "ratio": 4},
                    "pattern": {"entries": 4, "patterns": 8}},
                   {"match": "classifier.0.weight", "prune": {"ratio": 20}, "balance": {"filter": 16, "channel": 4}},
                   {"match": "classifier.3.weight", "prune": {"ratio": 2}}]}
MIXTURE = {"rules": [{**r, "quantize": {"bits": 2, "groups": {"filter": 16}}} for r in PRUNE["rules"][:2]]
           + [{**PRUNE["rules"][2], "quantize": {"bits": 3}}]}


def tiny_pipeline(tmp: Path, **over) -> Path:
    cfg = {
        "name": "tiny", "seed": 0, "model": {"name": "smallcnn"},
        "data": {"name": "fashion-mnist", "batch_size": 100, "limit_train": 3000, "limit_test": 1000},
        "stages": [
            {"name": "dense_pretrain", "epochs": 2, "optimizer": {"lr": 0.05}},
            {"name": "progressive_prune", "epochs": 1, "spec": "prune.yaml", "optimizer": {"lr": 0.02},
             "enforce": {"method": "progressive", "update_every": 5, "end": 0.7}},
            {"name": "quantize", "epochs": 1, "spec": MIXTURE, "optimizer": {"lr": 0.01, "weight_decay": 0.0}},
            {"name": "finetune", "epochs": 1, "optimizer": {"lr": 0.002, "weight_decay": 0.0}},
        ],
    }
    cfg.update(over)
    (tmp / "prune.yaml").write_text(yaml.safe_dump(PRUNE))
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    path = tiny_pipeline(tmp)
    reports = run_pipeline(load_pipeline(path), load_cluster(SINGLE), tmp / "out", log=lambda s: None)
    return tmp, path, reports


def test_every_stage_writes_checkpoint_and_report(run):
    tmp, _, reports = run
    assert [r["stage"] for r in reports] == ["dense_pretrain", "progressive_prune", "quantize", "finetune"]
    for r in reports:
        d = tmp / "out" / r["stage"]
        rep = json.loads((d / "report.json").read_text())
        for key in ("stage", "top1", "top5", "total_params", "nonzeros", "pruning_ratio", "nominal_compression",
                    "storage_bits", "world_size", "seconds"):
            assert key in rep, key
        ck = torch.load(d / "checkpoint.pt", weights_only=True)
        assert ck["local_dict"]["finished"] and ck["stage"] == r["stage"]
    assert reports[0]["top1"] > 0.6  # it learned: 10 classes, chance is 0.1


def test_stage_outputs_pass_verify_and_masks_only_shrink(run):
    tmp, _, reports = run
    specs = {"progressive_prune": PRUNE, "quantize": MIXTURE, "finetune": MIXTURE}
    prev_masks = None
    for stage, spec in specs.items():
        ck = checkpoint.load(tmp / "out" / stage / "checkpoint.pt")
        sd = ck["model_state_dict"]
        plans = resolve(parse(spec), {k: tuple(v.shape) for k, v in sd.items()})
        assert verify(plans, sd, checkpoint.buffers(ck)["pattern_library"]) == []
        masks = checkpoint.buffers(ck)["weight_mask"]
        for n, m in masks.items():
            assert torch.equal(sd[n] != 0, m)
            if prev_masks is not None:
                assert not (m & ~prev_masks[n]).any(), f"{stage} revived weights of {n}"
        prev_masks = masks
    final = checkpoint.load(tmp / "out" / "finetune" / "checkpoint.pt")["model_state_dict"]
    for n in ("features.3.weight", "classifier.0.weight"):
        for g in final[n].reshape(16, -1):
            assert g[g != 0].unique().numel() <= 4  # 2-bit codes, 16 codebooks


def test_report_matches_an_independent_recount(run):
    tmp, path, reports = run
    cfg = load_pipeline(path)
    bundle = load_data(cfg.data)
    _, test_loader = make_loaders(bundle, cfg.data, "cpu")
    bits = {"features.3.weight": 2, "classifier.0.weight": 2, "classifier.3.weight": 3}
    for r in reports[1:]:
        ck = torch.load(tmp / "out" / r["stage"] / "checkpoint.pt", weights_only=True)
        sd = ck["model_state_dict"]
        layers = {k: v for k, v in sd.items() if v.dim() in (2, 4)}
        params = sum(v.numel() for v in layers.values())
        nnz = sum(int((v != 0).sum()) for v in layers.values())
        b = bits if r["stage"] != "progressive_prune" else {}
        nominal = 32 * params / sum(int((v != 0).sum()) * b.get(k, 32) for k, v in layers.items())
        assert (r["total_params"], r["nonzeros"]) == (params, nnz)
        assert r["pruning_ratio"] == pytest.approx(params / nnz)
        assert r["nominal_compression"] == pytest.approx(nominal)
        model = build_model("smallcnn", num_classes=10, in_channels=1)
        model.load_state_dict(sd)
        assert evaluate(model, test_loader)["top1"] == pytest.approx(r["top1"])
        # the packed artifact beside the checkpoint: its bytes are the honest ratio, its weights the same
        etz = tmp / "out" / r["stage"] / "model.etz"
        assert r["artifact_bytes"] == etz.stat().st_size
        assert r["honest_compression"] == pytest.approx(32 * params / (8 * r["artifact_weights_bytes"]))
        assert r["honest_compression"] < r["nominal_compression"]
        packed = artifact.load(etz)["model_state_dict"]
        assert all(torch.equal(packed[k], v) for k, v in sd.items())


def test_rerun_skips_finished_stages(run):
    tmp, path, _ = run
    ck = tmp / "out" / "quantize" / "checkpoint.pt"
    before = (ck.stat().st_mtime_ns, ck.read_bytes())
    lines = []
    assert run_pipeline(load_pipeline(path), load_cluster(SINGLE), tmp / "out", log=lines.append) == []
    assert sum("(skipped)" in line for line in lines) == 4
    assert (ck.stat().st_mtime_ns, ck.read_bytes()) == before


def test_stages_option_needs_earlier_stages(tmp_path):
    path = tiny_pipeline(tmp_path)
    with pytest.raises(ConfigError, match="--stages: stage 'dense_pretrain' must run first"):
        run_pipeline(load_pipeline(path), load_cluster(SINGLE), tmp_path / "out", only=["quantize"])


def test_a_stage_that_loosens_the_previous_one_is_refused_before_training(tmp_path):
    loose = {"rules": [{**r, "prune": {**r["prune"], "ratio": 2}} if "prune" in r else r for r in MIXTURE["rules"]]}
    path = tiny_pipeline(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["stages"][2]["spec"] = loose
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"stages\[2\].spec: keeps .* under stages\[1\] \(progressive_prune\) "
                                          r"\(a later stage may only tighten\)"):
        run_pipeline(load_pipeline(path), load_cluster(SINGLE), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["stages"][0].update(epochs=0), "stages[0].epochs: must be >= 1"),
    (lambda c: c["stages"][1].update(spec=None), "stages[1].spec: a progressive_prune stage needs a compression spec"),
    (lambda c: c["stages"][1].update(spec="missing.yaml"), "stages[1].spec: no such file"),
    (lambda c: c["stages"][0]["optimizer"].update(lr=-1), "stages[0].optimizer.lr: must be > 0"),
    (lambda c: c["stages"][1]["enforce"].update(method="magic"), "stages[1].enforce.method: must be one of"),
    (lambda c: c["data"].update(name="imagenet"), "data.name: must be one of"),
    (lambda c: c.update(epochs=3), "epochs: unknown key"),
    (lambda c: c["stages"].append({"name": "quantize", "spec": MIXTURE}), "stages[4].name: duplicate stage name"),
])
def test_bad_pipeline_is_one_line_error(tmp_path, capsys, edit, message):
    path = tiny_pipeline(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_overrides_address_stages_by_name_index_and_star():
    from elastictrain.config import apply_overrides

    raw = {"data": {"batch_size": 128}, "stages": [{"name": "a", "epochs": 4}, {"name": "b", "epochs": 2}]}
    out = apply_overrides(raw, ["stages.*.epochs=1", "stages.b.optimizer.lr=0.5", "stages.0.name=z",
                                "data.limit_train=1000", "data.augment=[crop, flip]"])
    assert out == {"data": {"batch_size": 128, "limit_train": 1000, "augment": ["crop", "flip"]},
                   "stages": [{"name": "z", "epochs": 1}, {"name": "b", "epochs": 1, "optimizer": {"lr": 0.5}}]}
    assert raw["stages"][0] == {"name": "a", "epochs": 4}  # the input is untouched


@pytest.mark.parametrize("override,message", [
    ("epochs", "--set 'epochs': expected KEY=VALUE"),
    ("stages.prune.epochs=1", "--set stages.prune.epochs: no item 'prune' in the list "
                              "(names: dense_pretrain, progressive_prune, quantize, finetune)"),
    ("data.batch_size.x=1", "--set data.batch_size.x: 'batch_size' holds 100, not a mapping"),
    ("data.batch_sise=64", "data.batch_sise: unknown key"),
    ("stages.quantize.epochs=zero", "stages[2].epochs: expected an integer, got 'zero'"),
    ("stages.*.epochs=0", "stages[0].epochs: must be >= 1"),
])
def test_bad_override_is_one_line_error_and_writes_nothing(tmp_path, capsys, override, message):
    path = tiny_pipeline(tmp_path)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_run_keeps_the_resolved_pipeline(tmp_path):
    path = tiny_pipeline(tmp_path, stages=[{"name": "dense_pretrain", "epochs": 3}])
    assert main(["run", str(path), "--cluster", str(SINGLE), "--out", str(tmp_path / "out"),
                 "--set", "stages.*.epochs=1", "--set", "data.limit_train=200", "--set", "data.limit_test=100"]) == 0
    snap = tmp_path / "out" / "pipeline.yaml"
    assert "--set stages.*.epochs=1 data.limit_train=200" in snap.read_text().splitlines()[0]
    cfg = load_pipeline(snap)
    assert cfg.stages[0].epochs == 1 and cfg.data.limit_train == 200
    report = json.loads((tmp_path / "out" / "dense_pretrain" / "report.json").read_text())
    assert report["epochs"] == 1 and len(report["history"]) == 1


ZERO3 = str(Path(__file__).resolve().parents[1] / "configs/specs/smallcnn-zero3-prune.yaml")


@pytest.mark.parametrize("cluster,edit,message", [
    ({"deepspeed": {"precision": "fp16"}}, None, "deepspeed.precision: fp16 is not supported"),
    ({"deepspeed": {"zero_stage": 3}}, None, "stages[1].spec: rules[0].pattern on features.3.weight: "
                                             "pattern pruning picks positions "
                                             "inside kernels, which ZeRO-3 slices can cut"),
    ({"deepspeed": {"zero_stage": 3}}, lambda c: [c["stages"][1].update(spec=ZERO3, enforce={"method": "admm"}),
                                                  c["stages"].pop(2)],
     "stages[1].enforce.method: admm keeps whole-weight Z and U; it needs deepspeed.zero_stage 0–2"),
    ({"deepspeed": {"zero_stage": 2, "sparse_reduce": True}}, None, "deepspeed.sparse_reduce: needs zero_stage 0"),
    ({"deepspeed": {"zero_stage": 2, "shared_memory": True}}, None, "deepspeed.shared_memory: needs zero_stage 0"),
    ({"deepspeed": {"zero_stage": 0, "shared_memory": "yes"}}, None, "deepspeed.shared_memory: must be one of"),
])
def test_bad_cluster_is_one_line_error_before_any_worker(tmp_path, capsys, cluster, edit, message):
    """Refused on the driver, before Ray starts: nothing is written."""
    path = tiny_pipeline(tmp_path)
    if edit is not None:
        cfg = yaml.safe_load(path.read_text())
        edit(cfg)
        path.write_text(yaml.safe_dump(cfg))
    clu = tmp_path / "cluster.yaml"
    clu.write_text(yaml.safe_dump({"name": "bad", "kind": "ray", "device": "cpu",
                                   "ray": {"address": "local", "num_workers": 2, "storage_path": str(tmp_path / "ray")},
                                   **cluster}))
    assert main(["run", str(path), "--cluster", str(clu), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ray").exists()
