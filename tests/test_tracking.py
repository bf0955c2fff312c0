"""W&B tracking with W&B's own offline mode (nothing leaves the machine): one run per stage,
grouped by the pipeline run, whose history holds the metrics — read back from the run files with
W&B's protobuf records (tests/wandb_file.py), not inferred from a directory existing. A stage run
again after a failure continues its W&B run; ``disabled`` leaves nothing; no secret is written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from wandb_file import read_run

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.is_file(),
                                reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
QUICKSTART = ROOT / "configs/experiments/quickstart.yaml"
FAST = ["data.limit_train=1200", "data.limit_test=400", "data.batch_size=100", "stages.*.epochs=1",
        "stages.dense_pretrain.epochs=2", "stages.progressive_prune.enforce.update_every=2",
        "stages.quantize.enforce.refit_every=4", "stages.finetune.enforce.refit_every=4",
        "tracking.wandb.log_every=2", "tracking.progress=lines"]
SINGLE = ROOT / "configs/clusters/single.yaml"
SECRET = "et0test0secret0" + "9" * 25  # looks like a 40-character API key


def _run(out: Path, *extra: str) -> int:
    return main(["run", str(QUICKSTART), "--cluster", str(SINGLE), "--out", str(out)]
                + [a for o in [*FAST, *extra] for a in ("--set", o)])


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_API_KEY", SECRET)
    out = tmp_path_factory.mktemp("tracked") / "run"
    out.mkdir()
    (out / "finetune").write_text("a file where the stage's folder should be")  # the last stage fails once
    with pytest.raises(OSError):
        _run(out)
    (out / "finetune").unlink()
    assert _run(out) == 0  # the rerun skips the three finished stages and runs finetune again
    mp.undo()
    runs = {}
    for f in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        r = read_run(f)
        runs.setdefault(r["run"]["job_type"], []).append(r)
    return out, runs


def test_one_grouped_run_per_stage_with_the_resolved_config(offline_run):
    out, runs = offline_run
    assert sorted(runs) == sorted(["dense_pretrain", "progressive_prune", "quantize", "finetune"])
    assert [len(runs[s]) for s in ("dense_pretrain", "progressive_prune", "quantize")] == [1, 1, 1]
    ids = json.loads((out / "tracking.json").read_text())
    groups = {r["run"]["group"] for rs in runs.values() for r in rs}
    assert groups == {ids["group"]} and ids["group"].startswith("quickstart-")
    for stage, rs in runs.items():
        assert {r["run"]["id"] for r in rs} == {ids["runs"][stage]}
        cfg = rs[-1]["config"]
        assert cfg["stage"]["name"] == stage and cfg["pipeline"]["name"] == "quickstart"
        assert cfg["pipeline"]["data"]["limit_train"] == 1200  # the resolved config, overrides applied
        assert cfg["cluster"]["kind"] == "single" and cfg["world_size"] == 1


def test_history_holds_step_epoch_and_constraint_metrics(offline_run):
    out, runs = offline_run

    def series(stage, key):
        return [h[key] for h in runs[stage][-1]["history"] if key in h]

    # 12 steps per epoch, logged every 2 steps
    assert len(series("dense_pretrain", "train/loss")) == 12 and len(series("dense_pretrain", "test/top1")) == 2
    assert series("dense_pretrain", "train/lr")[0] > 0 and min(series("dense_pretrain", "train/lr")) >= 0
    assert series("dense_pretrain", "train/lr")[0] > series("dense_pretrain", "train/lr")[-1]  # cosine decays
    assert all(v > 0 for v in series("dense_pretrain", "train/images_per_s"))
    for stage in ("dense_pretrain", "progressive_prune", "quantize", "finetune"):
        report = json.loads((out / stage / "report.json").read_text())
        assert series(stage, "test/top1")[-1] == pytest.approx(report["history"][-1]["top1"])
        assert runs[stage][-1]["summary"]["top1"] == pytest.approx(report["top1"])
        assert runs[stage][-1]["summary"]["honest_compression"] == pytest.approx(report["honest_compression"])
    # progressive pruning: a record per mask update, density falling to the spec's
    changes = series("progressive_prune", "constraints/mask_changes")
    density = series("progressive_prune", "constraints/density")
    assert len(changes) >= 3 and sum(changes) > 0 and density == sorted(density, reverse=True)
    prune = json.loads((out / "progressive_prune" / "report.json").read_text())
    assert series("progressive_prune", "compression/nominal")[-1] == pytest.approx(prune["nominal_compression"])
    assert series("progressive_prune", "compression/stored_bits")[-1] == pytest.approx(prune["storage_compression"])
    refits = series("quantize", "constraints/codebook_refits")
    assert refits == list(range(refits[0], refits[0] + len(refits))) and len(refits) >= 2
    quant = json.loads((out / "quantize" / "report.json").read_text())
    assert quant["constraint_stats"]["codebook_refits"] == refits[-1]
    assert series("quantize", "compression/nominal")[-1] > series("progressive_prune", "compression/nominal")[-1]


def test_report_table_and_checkpoint_artifact(offline_run):
    out, runs = offline_run
    last = runs["quantize"][-1]
    table = [h for h in last["history"] if "report/layers/_type" in h]
    assert len(table) == 1 and table[0]["report/layers/_type"] == "table-file"
    report = json.loads((out / "quantize" / "report.json").read_text())
    files = next(f.parent / "files" for f in (out / "wandb").glob(f"offline-run-*-{last['run']['id']}/run-*.wandb"))
    logged = json.loads((files / table[0]["report/layers/path"]).read_text())
    rows = [dict(zip(logged["columns"], r)) for r in logged["data"]]
    assert [(r["name"], r["nonzeros"], r["unique_values"]) for r in rows] == \
        [(l["name"], l["nonzeros"], l["unique_values"]) for l in report["layers"]]
    art = [a for a in last["artifacts"] if a.type == "model"]
    assert len(art) == 1
    refs = {e.path: e.ref for e in art[0].manifest.contents}
    assert refs == {"checkpoint.pt": f"file://{(out / 'quantize' / 'checkpoint.pt').resolve()}",
                    "model.etz": f"file://{(out / 'quantize' / 'model.etz').resolve()}"}


def test_a_stage_run_again_continues_its_wandb_run(offline_run):
    out, runs = offline_run
    first, second = runs["finetune"]
    assert first["run"]["id"] == second["run"]["id"]
    assert first["exit_code"] == 1 and second["exit_code"] == 0
    assert "top1" in second["summary"] and "top1" not in first["summary"]


def test_no_secret_anywhere_in_the_run_directory(offline_run):
    out, _ = offline_run
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_disabled_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "run"
    assert main(["run", str(QUICKSTART), "--cluster", str(SINGLE), "--out", str(out),
                 "--set", "stages=[{name: dense_pretrain}]",
                 "--set", "data.limit_train=200", "--set", "data.limit_test=100"]) == 0
    assert (out / "dense_pretrain" / "report.json").is_file()
    assert not (out / "wandb").exists() and not (out / "tracking.json").exists()
    assert not list(tmp_path.rglob("*.wandb"))


def test_a_bad_wandb_mode_is_one_line_error_before_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    assert main(["run", str(QUICKSTART), "--cluster", str(SINGLE), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tracking.wandb.mode: auto took WANDB_MODE='sometimes'" in err, err
    assert not (tmp_path / "run").exists()


def test_report_joins_the_tracked_run(offline_run, tmp_path, capsys):
    import pyarrow.parquet as pq

    out, _ = offline_run
    assert main(["report", str(out), "--out", str(tmp_path)]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| fashion-mnist | smallcnn |")]
    assert [r.split("|")[4].strip() for r in rows] == ["dense_pretrain", "progressive_prune", "quantize", "finetune"]
    for stage in ("progressive_prune", "finetune"):
        report = json.loads((out / stage / "report.json").read_text())
        table = pq.read_table(out / stage / "layers.parquet").to_pylist()
        constrained = {l["name"]: l["nonzeros"] for l in report["layers"] if l.get("rule") is not None}
        assert {r["name"]: r["nonzeros"] for r in table} == constrained
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["accuracy_vs_compression.png", "density_run.png",
                                                             "weights_run.png"]


def test_wandb_dir_from_the_environment_wins_over_the_run_directory(tmp_path, monkeypatch):
    """``WANDB_DIR`` is W&B's own setting: a user who sets it finds the stage's run there (W&B adds
    its ``wandb/`` folder), and nothing under RUN_DIR/wandb; the snapshot carries it to workers."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    out = tmp_path / "run"
    assert _run(out, "stages=[{name: dense_pretrain, epochs: 1}]") == 0
    found = list((tmp_path / "elsewhere" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(found) == 1 and read_run(found[0])["run"]["job_type"] == "dense_pretrain"
    assert not (out / "wandb").exists()
    assert f"dir: {tmp_path / 'elsewhere'}" in (out / "pipeline.yaml").read_text()
