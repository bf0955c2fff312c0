"""bench/table.py: every row of both tiers validates against its model (the GPU tier is never
trained here), and a tiny quantized row through the real pipeline gives a table whose figures
agree with the stage reports and with each other; a rerun trains nothing."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import table  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("tier", ["cpu", "gpu"])
def test_every_row_validates(tier, capsys):
    plan = table.main(["--tier", tier, "--dry-run"])["plan"]
    assert [p["row"] for p in plan] == [r.name for r in table.TIERS[tier].rows]
    assert f"{len(plan)} rows validate" in capsys.readouterr().out


def test_gpu_tier_is_the_seeds_rows():
    rows = {r.name: r for r in table.GPU.rows}
    assert {r.seed for r in rows.values() if r.seed} == set(table.SEED)
    assert table.GPU.data["pad_to"] == 32 and table.GPU.model == "vgg16"
    for r in rows.values():  # spec files exist, shared stages prune to the same spec
        for spec in filter(None, (r.prune, r.quant)):
            assert (table.SPECS / spec).is_file(), spec
        if r.prune_from:
            assert rows[r.prune_from].prune == r.prune


def test_unknown_row_is_refused():
    with pytest.raises(SystemExit):
        table.main(["--rows", "nope", "--dry-run"])


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing")
def test_quick_row_figures_come_from_the_reports(tmp_path, capsys):
    argv = ["--quick", "--rows", "200x-2bit-64cb", "--train-images", "1000", "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results")]
    table.main(argv)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)  # the JSON is the last line of stdout
    assert (tmp_path / "results" / "table-cpu-quick.json").is_file()
    assert result["quick"] and result["machine"]["logical_cores"] >= 1
    rows = {r["row"]: r for r in result["rows"]}
    # 200x-unstructured only lent its prune stage: not a finished row, so not in the table
    assert set(rows) == {"dense", "200x-2bit-64cb"} and "200x-unstructured" in result["missing_rows"]
    run = tmp_path / "runs" / "200x-2bit-64cb"
    assert (run / "dense_pretrain").is_symlink() and (run / "progressive_prune").is_symlink()
    f = rows["200x-2bit-64cb"]["figures"]
    rep = json.loads((run / "finetune" / "report.json").read_text())
    dense = json.loads((tmp_path / "runs" / "dense" / "dense_pretrain" / "report.json").read_text())
    assert f["top1"] == rep["top1"] and f["honest_compression"] == rep["honest_compression"]
    assert f["drop_pp"] == pytest.approx(100 * (rep["top1"] - dense["top1"]))
    # 64 codebooks a layer, but the first conv's 32 filters of one 3×3 kernel allow 32
    assert f["bits"] == [2] and f["codebooks_per_layer"] == {"features.0.weight": 32, **{
        n: 64 for n in ("features.3.weight", "features.6.weight", "features.10.weight", "features.13.weight",
                        "classifier.weight")}}
    assert f["pruning_ratio"] == pytest.approx(200, rel=0.01)
    assert f["nominal_compression"] == pytest.approx(16 * f["pruning_ratio"])  # 32 / 2 bits on every weight
    assert 1 < f["honest_compression"] < f["nominal_compression"]  # indices and codebooks cost bits
    assert f["seed"]["row"].startswith("16000×") and f["shared_stages"] == ["progressive_prune"]
    assert rows["dense"]["figures"]["pgd"]["images"] == 200  # the dense model's PGD accuracy is measured
    # a rerun trains nothing: every figure is the same, the reports untouched
    mtime = (run / "finetune" / "report.json").stat().st_mtime_ns
    again = table.main(argv)
    assert {r["row"]: r["figures"] for r in again["rows"]} == {r: v["figures"] for r, v in rows.items()}
    assert (run / "finetune" / "report.json").stat().st_mtime_ns == mtime


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing")
def test_run_dir_of_another_configuration_is_refused(tmp_path):
    from elastictrain.config import ConfigError

    base = ["--rows", "dense", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    table.main(["--quick", "--train-images", "500", *base])
    with pytest.raises(ConfigError, match="another configuration"):
        table.main(["--quick", "--train-images", "600", *base])
