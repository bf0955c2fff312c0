"""Reports of a real (tiny) run: the per-stage Parquet table against an independent recount from
the checkpoint tensors, the seed-shaped table against report.json, the plots as readable PNGs,
and a run with nothing finished refused in one line."""
import json
import re
import shutil
from pathlib import Path

import matplotlib.image
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from elastictrain import checkpoint
from elastictrain.config import ConfigError
from elastictrain.constraints.plan import resolve
from elastictrain.constraints.spec import parse
from pipeline.cli import main
from pipeline.config import load_cluster, read_pipeline
from pipeline.report import run_report, write_stage_tables
from pipeline.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist "
                                       "(make test does it)")
STAGES = ["dense_pretrain", "progressive_prune", "quantize", "finetune"]
PRUNE = {"rules": [{"match": "features.3.weight", "prune": {"unit": "kernel", "ratio": 4},
                    "pattern": {"entries": 4, "patterns": 8}},
                   {"match": "classifier.0.weight", "prune": {"ratio": 20}, "balance": {"filter": 16, "channel": 4}},
                   {"match": "classifier.3.weight", "nm": "2:4"}]}
MIXTURE = {"rules": [{**r, "quantize": {"bits": 2, "groups": {"filter": 16}}} for r in PRUNE["rules"][:2]]
           + [{**PRUNE["rules"][2], "quantize": {"bits": 3}}]}
# the layer's balance workloads, written out by hand: (F, C) → (workload rows, columns of the view)
WORKLOADS = {"classifier.0.weight": lambda w: (w != 0).reshape(16, 16, 4, 784).sum((1, 3)),  # filter 16 × channel 4
             "classifier.3.weight": lambda w: (w != 0).reshape(10, 64, 4).sum(2)}            # 2:4 along inputs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cfg = {"name": "tiny", "seed": 0, "model": {"name": "smallcnn"},
           "data": {"name": "fashion-mnist", "batch_size": 100, "limit_train": 1000, "limit_test": 500},
           "stages": [{"name": "dense_pretrain", "epochs": 1, "optimizer": {"lr": 0.05}},
                      {"name": "progressive_prune", "epochs": 1, "spec": PRUNE, "optimizer": {"lr": 0.02},
                       "enforce": {"method": "progressive", "update_every": 3, "end": 0.7}},
                      {"name": "quantize", "epochs": 1, "spec": MIXTURE,
                       "optimizer": {"lr": 0.01, "weight_decay": 0.0}},
                      {"name": "finetune", "epochs": 1, "optimizer": {"lr": 0.002, "weight_decay": 0.0},
                       "adversarial": {"attack": {"kind": "fgsm"}, "eval_images": 100}}]}
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    source = read_pipeline(path)
    run_pipeline(source.cfg, load_cluster(ROOT / "configs/clusters/single.yaml"), tmp / "out", source=source,
                 log=lambda s: None)
    return tmp / "out"


def _stage(run_dir: Path, stage: str):
    ck = checkpoint.load(run_dir / stage / "checkpoint.pt")
    return ck, checkpoint.model_state(ck), json.loads((run_dir / stage / "report.json").read_text())


@pytest.mark.parametrize("stage", STAGES)
def test_layer_table_matches_a_recount_from_the_checkpoint(run, stage):
    ck, sd, rep = _stage(run, stage)
    # the table the stage itself wrote
    table = pq.read_table(run / stage / "layers.parquet")
    assert table.schema.metadata[b"format"] == b"elastictrain.layers/1"
    rows = {r["name"]: r for r in table.to_pylist()}
    expected = (set() if stage == "dense_pretrain"
                else {"features.3.weight", "classifier.0.weight", "classifier.3.weight"})
    assert set(rows) == expected  # one row per constrained layer; features.0 is free
    for name, r in rows.items():
        w = sd[name]
        nz = w[w != 0]
        assert r["shape"] == list(w.shape)
        assert (r["params"], r["nonzeros"]) == (w.numel(), nz.numel())
        assert r["density"] == pytest.approx(nz.numel() / w.numel())
        assert r["unique_values"] == torch.unique(nz).numel()
        if name in WORKLOADS:
            per = WORKLOADS[name](w)
            assert (r["balance_min"], r["balance_max"]) == (int(per.min()), int(per.max()))
        else:
            assert r["balance_min"] is None and r["balance_max"] is None
    if stage in ("quantize", "finetune"):  # codes: 2 bits in 16 groups, 3 bits in one codebook
        assert {n: (r["bits"], r["codebooks"]) for n, r in rows.items()} == {
            "features.3.weight": (2, 16), "classifier.0.weight": (2, 16), "classifier.3.weight": (3, 1)}
        assert rows["classifier.3.weight"]["unique_values"] <= 8 and rows["classifier.0.weight"]["unique_values"] <= 64
    if expected:  # the stage's own constraints hold, so the balance columns can show them
        assert rows["classifier.0.weight"]["balance_min"] == rows["classifier.0.weight"]["balance_max"] > 0
        assert rows["classifier.3.weight"]["balance_max"] == 2
        assert rows["features.3.weight"]["structure"] == "pattern 4-of-9 + kernel"
    md = (run / stage / "report.md").read_text()
    assert f"top-1 {100 * rep['top1']:.2f}%" in md and f"({rep['artifact_bytes']:,} B)" in md
    assert all(f"| {n} |" in md for n in expected)


def _cells(md: str) -> list[list[str]]:
    lines = [l for l in md.splitlines() if l.startswith("| ")][2:]  # without the header and its rule
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines]


def _ratio(cell: str) -> float:
    return float(re.match(r"([\d,.]+)×", cell).group(1).replace(",", ""))


def test_run_report_has_one_row_per_stage_with_the_reported_numbers(run, tmp_path, capsys):
    second = tmp_path / "second"
    shutil.copytree(run, second)  # keeps mtimes: without pipeline.yaml, stages go in checkpoint order
    (second / "pipeline.yaml").unlink()
    out = tmp_path / "rep"
    assert main(["report", str(run), str(second), "--out", str(out)]) == 0
    md = capsys.readouterr().out
    assert (out / "report.md").read_text() == md
    rows = _cells(md)
    assert len(rows) == 9 and rows[4] == [""] * 12  # 4 stages, a blank row, 4 stages
    for row, stage in zip(rows[:4] + rows[5:], STAGES * 2):
        rep = json.loads((run / stage / "report.json").read_text())
        data, model, pipe, name, nominal, pruning, structure, bits, books, acc, robust, honest = row
        assert (data, model, pipe, name) == ("fashion-mnist", "smallcnn", "tiny", stage)
        assert float(acc.rstrip("%")) == pytest.approx(100 * rep["top1"], abs=0.005)
        assert _ratio(nominal) == pytest.approx(rep["nominal_compression"], rel=5e-3)
        assert _ratio(pruning) == pytest.approx(rep["pruning_ratio"], rel=5e-3)
        assert _ratio(honest) == pytest.approx(rep["honest_compression"], rel=5e-3)
        assert honest.endswith(f"({(run / stage / 'model.etz').stat().st_size:,} B)")
        if stage == "dense_pretrain":
            assert (structure, bits, books, _ratio(nominal)) == ("-", "-", "-", 1.0)
        else:
            assert structure == "mixed (pattern 4-of-9 + kernel; balanced filter 16 × channel 4; 2:4)"
        if stage in ("quantize", "finetune"):
            assert books == "1–16" and bits.startswith("2–3/")
            assert _ratio(bits[4:]) == pytest.approx(rep["nominal_compression"] / rep["pruning_ratio"], rel=5e-3)
        if stage == "finetune":
            assert re.fullmatch(r"fgsm ([\d.]+)%", robust)
            assert float(robust.split()[1].rstrip("%")) == pytest.approx(100 * rep["robust"]["fgsm"], abs=0.005)
        else:
            assert robust == "-"


def test_plots_are_valid_pngs_showing_the_reported_values(run, tmp_path, monkeypatch):
    import pipeline.plots as plots

    drawn = []  # the figure run_report saves as accuracy_vs_compression.png
    make = plots.compression_figure
    monkeypatch.setattr(plots, "compression_figure", lambda runs: drawn.append(make(runs)) or drawn[-1])
    out = tmp_path / "rep"
    run_report([run], out)
    for png in ("accuracy_vs_compression.png", "density_out.png", "weights_out.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png
        img = matplotlib.image.imread(out / png)
        assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 400, (png, img.shape)
        assert img[..., :3].std() > 0.05, f"{png} is blank"
    reps = [json.loads((run / s / "report.json").read_text()) for s in STAGES]
    (ax,) = drawn[0].axes
    lines = {l.get_label(): l for l in ax.get_lines()}
    assert list(lines["out: nominal"].get_xdata()) == pytest.approx([r["nominal_compression"] for r in reps])
    assert list(lines["out: honest (model.etz)"].get_xdata()) == pytest.approx([r["honest_compression"] for r in reps])
    assert list(lines["out: nominal"].get_ydata()) == pytest.approx([100 * r["top1"] for r in reps])
    assert [t.get_text() for t in ax.texts] == STAGES
    assert ax.get_xscale() == "log" and ax.get_xlabel() and ax.get_ylabel() == "top-1 accuracy (%)"


def test_balance_columns_measure_the_weights_rather_than_assume_the_spec(run, tmp_path):
    ck, sd, rep = _stage(run, "finetune")
    plans = resolve(parse(ck["spec"]), {k: tuple(v.shape) for k, v in sd.items()})
    w = sd["classifier.0.weight"].clone()
    first = (w[:16, :784] != 0).nonzero()[:5]  # five kept weights of workload (0, 0)
    w[first[:, 0], first[:, 1]] = 0
    write_stage_tables(tmp_path, rep, {**sd, "classifier.0.weight": w}, plans)
    row = next(r for r in pq.read_table(tmp_path / "layers.parquet").to_pylist() if r["name"] == "classifier.0.weight")
    per = WORKLOADS["classifier.0.weight"](w)
    kept = int(WORKLOADS["classifier.0.weight"](sd["classifier.0.weight"]).max())
    assert (row["balance_min"], row["balance_max"]) == (int(per.min()), int(per.max())) == (kept - 5, kept)
    assert row["nonzeros"] == int((sd["classifier.0.weight"] != 0).sum()) - 5
    assert f"| {kept - 5}–{kept} |" in (tmp_path / "report.md").read_text()


def test_a_run_without_finished_stages_is_a_one_line_error(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "dense_pretrain").mkdir(parents=True)
    ck = checkpoint.load(run / "dense_pretrain" / "checkpoint.pt")
    ck["local_dict"] = {**ck["local_dict"], "finished": False}  # interrupted: a checkpoint, not finished
    checkpoint.atomic_save(ck, empty / "dense_pretrain" / "checkpoint.pt")
    shutil.copy(run / "dense_pretrain" / "report.json", empty / "dense_pretrain")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(empty))}: no finished stage") as e:
        run_report([run, empty], tmp_path / "rep")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "rep").exists()  # every run is checked before anything is written
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: no such run directory" in err
