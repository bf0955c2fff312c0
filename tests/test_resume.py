"""Faults survived by a single-process run, inflicted for real:

- the ``elastictrain run`` process SIGKILLed mid-stage; the same command again resumes the stage
  from its last completed epoch and ends bit-identical to a run never interrupted (weights,
  masks, codebooks, history) — for a progressive-prune + QAT pipeline with PGD adversarial
  training (optimizer, LR schedule, RNG, codebooks) and for ADMM (Z, U, ρ);
- the newest resume point corrupted on disk: named, and the one before it used (still exact);
- a finished checkpoint corrupted: named, and the stage run again;
- NaN from a diverging LR: the stage stops with one line naming the stage and the last good
  point, which is kept intact.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from elastictrain import checkpoint
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.is_file(),
                                reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
PRUNE = str(ROOT / "configs/specs/smallcnn-prune.yaml")
MIXTURE = str(ROOT / "configs/specs/smallcnn-mixture.yaml")

QAT = [{"name": "dense_pretrain", "epochs": 1, "optimizer": {"lr": 0.05}},
       {"name": "progressive_prune", "epochs": 2, "spec": PRUNE, "optimizer": {"lr": 0.02},
        "enforce": {"method": "progressive", "update_every": 5, "end": 0.8}},
       {"name": "quantize", "epochs": 4, "spec": MIXTURE, "optimizer": {"lr": 0.01, "weight_decay": 0.0},
        "enforce": {"method": "fixed", "refit_every": 7},
        "adversarial": {"beta": 0.5, "attack": {"kind": "pgd", "eps": 0.05, "steps": 1}, "eval_images": 0}}]
ADMM = [{"name": "dense_pretrain", "epochs": 1, "optimizer": {"lr": 0.05}},
        {"name": "progressive_prune", "epochs": 4, "spec": PRUNE, "optimizer": {"lr": 0.02},
         "enforce": {"method": "admm", "update_every": 6, "end": 0.6}}]


def _setup(tmp: Path, stages: list, limit: int = 2000) -> tuple[Path, Path]:
    pipe = tmp / "pipeline.yaml"
    pipe.write_text(yaml.safe_dump({"name": "resume", "seed": 0, "model": {"name": "smallcnn"},
                                    "data": {"name": "fashion-mnist", "batch_size": 100, "limit_train": limit,
                                             "limit_test": 300},
                                    "tracking": {"progress": "off"}, "stages": stages}))
    clu = tmp / "one-thread.yaml"
    clu.write_text(yaml.safe_dump({"name": "one-thread", "kind": "single", "device": "cpu", "threads": 1}))
    return pipe, clu


def _cmd(pipe: Path, clu: Path, out: Path) -> list[str]:
    return ["run", str(pipe), "--cluster", str(clu), "--out", str(out)]


def _kill_after(pipe: Path, clu: Path, out: Path, stage: str, epoch: int) -> None:
    """Start ``elastictrain run`` and SIGKILL it once ``stage`` committed its point after ``epoch``."""
    manifest = out / stage / "resume" / f"epoch-{epoch}" / "MANIFEST.json"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *_cmd(pipe, clu, out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + 300
    while not manifest.is_file():
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < end, "no resume point appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / stage / "checkpoint.pt").exists(), "killed too late: the stage had finished"


def _same_final(a: Path, b: Path, stage: str) -> None:
    ca, cb = checkpoint.load(a / stage / "checkpoint.pt"), checkpoint.load(b / stage / "checkpoint.pt")
    for k, v in ca["model_state_dict"].items():
        assert torch.equal(v, cb["model_state_dict"][k]), k
    ba, bb = checkpoint.buffers(ca), checkpoint.buffers(cb)
    for kind in ("weight_mask", "quantization_table", "pattern_library"):
        assert ba[kind].keys() == bb[kind].keys()
        for n in ba[kind]:
            assert torch.equal(ba[kind][n], bb[kind][n]), (kind, n)
    ra, rb = (json.loads((d / stage / "report.json").read_text()) for d in (a, b))
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("seconds", "images_per_s")} for e in h]
    assert strip(ra["history"]) == strip(rb["history"])
    assert ra["top1"] == rb["top1"] and ra["constraint_stats"] == rb["constraint_stats"]


@pytest.mark.parametrize("stages,stage", [(QAT, "quantize"), (ADMM, "progressive_prune")], ids=["qat-pgd", "admm"])
def test_killed_run_resumes_bit_identical(tmp_path, stages, stage, capsys):
    pipe, clu = _setup(tmp_path, stages)
    ref = tmp_path / "ref"
    assert main(_cmd(pipe, clu, ref)) == 0
    out = tmp_path / "killed"
    for done in [s["name"] for s in stages][:-1]:  # earlier stages as they finished (deterministic anyway)
        shutil.copytree(ref / done, out / done)
    _kill_after(pipe, clu, out, stage, 2)
    capsys.readouterr()
    assert main(_cmd(pipe, clu, out)) == 0
    log = capsys.readouterr().out
    assert f"[{stage}] resumed after epoch 2/4" in log or f"[{stage}] resumed after epoch 3/4" in log, log
    report = json.loads((out / stage / "report.json").read_text())
    assert report["resumed"]["checksum_restored"] == report["resumed"]["checksum_saved"]  # masks + codebooks exact
    _same_final(ref, out, stage)
    assert not (out / stage / "resume").exists()  # the finished checkpoint supersedes the points


def test_corrupted_newest_point_is_named_and_the_one_before_used(tmp_path, capsys):
    pipe, clu = _setup(tmp_path, ADMM)
    ref = tmp_path / "ref"
    assert main(_cmd(pipe, clu, ref)) == 0
    out = tmp_path / "killed"
    shutil.copytree(ref / "dense_pretrain", out / "dense_pretrain")
    _kill_after(pipe, clu, out, "progressive_prune", 2)
    points = out / "progressive_prune" / "resume"
    newest = max(points.glob("epoch-*"), key=lambda p: int(p.name[6:]))
    victim = newest / "engine.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # cut off, as a full disk or a dying node leaves it
    capsys.readouterr()
    assert main(_cmd(pipe, clu, out)) == 0
    log = capsys.readouterr().out
    assert f"{victim}: truncated or corrupted" in log, log
    assert f"resumed after epoch {int(newest.name[6:]) - 1}/4" in log, log
    _same_final(ref, out, "progressive_prune")


def test_corrupted_finished_checkpoint_is_named_and_redone(tmp_path, capsys):
    pipe, clu = _setup(tmp_path, QAT[:1], limit=500)
    out = tmp_path / "run"
    assert main(_cmd(pipe, clu, out)) == 0
    path = out / "dense_pretrain" / "checkpoint.pt"
    good = checkpoint.load(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern deep inside a tensor
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match="corrupted"):
        checkpoint.load(path)
    capsys.readouterr()
    assert main(_cmd(pipe, clu, out)) == 0
    assert f"{path}: corrupted" in capsys.readouterr().out
    again = checkpoint.load(path)
    assert all(torch.equal(v, again["model_state_dict"][k]) for k, v in good["model_state_dict"].items())


def test_nan_stops_the_stage_and_keeps_the_last_good_point(tmp_path, capsys):
    # the LR jumps ×1e12 halfway through: epoch 2 diverges after epoch 1 was fine
    stages = [{"name": "dense_pretrain", "epochs": 2, "optimizer": {"lr": 0.05},
               "lr_schedule": {"name": "step", "milestones": [0.5], "gamma": 1.0e12}}]
    pipe, clu = _setup(tmp_path, stages, limit=600)
    out = tmp_path / "run"
    assert main(_cmd(pipe, clu, out)) == 1
    err = capsys.readouterr().err.strip()
    points = out / "dense_pretrain" / "resume"
    assert "\n" not in err and err.startswith("elastictrain: stage failed: [dense_pretrain] stopped in epoch 2: "
                                              "the loss became NaN/Inf at step"), err
    assert f"the last good state (after epoch 1) is kept in {points}" in err
    assert not (out / "dense_pretrain" / "checkpoint.pt").exists()
    good = checkpoint.load(points / "epoch-1" / "engine.pt")  # intact (its hash checks) and finite
    assert all(bool(torch.isfinite(v).all()) for v in good["model"].values())
    assert sorted(p.name for p in points.iterdir()) == ["epoch-1"]
