"""Faults inside real Ray Train workers (conftest's in-process Ray, 2 workers, DeepSpeed over gloo)
reach the driver as one line, once: a rank's own error (config, diverged ranks, NaN, a bug) is
never retried — the worker group starts once — and only a lost worker restarts it, up to
``ray.max_failures``. Through the command line: exit code and one line as for one process, the
epoch lines once each on the console, other libraries' output in ``RUN_DIR/logs/``."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import ray_faults as faults
import yaml

from elastictrain.config import build
from elastictrain.train import StageFailed
from jobs.cluster import ClusterConfig
from jobs.ray_train import run_stage_on_ray
from pipeline.cli import main

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(autouse=True)
def _ray(ray_instance):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(faults)  # workers cannot import tests/
    return ray_instance


def _cluster(tmp: Path, max_failures: int = 3) -> ClusterConfig:
    return build(ClusterConfig, {"name": "faults", "kind": "ray", "device": "cpu", "threads": 1,
                                 "ray": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": max_failures,
                                         "storage_path": str(tmp / "ray")},
                                 "deepspeed": {"zero_stage": 0}})


def _starts(logs: Path) -> dict[int, int]:
    """How many times each rank's worker started (one header line per start in its log)."""
    return {r: len(re.findall(rf"^== .* rank {r} of 2 started", (logs / f"rank{r}.log").read_text(), re.M))
            for r in (0, 1) if (logs / f"rank{r}.log").is_file()}


CASES = [  # stage function, its one line (a config error and NaN: the command-line test below, for real)
    (faults.diverged, r"^\[faults-prune\] masks differ across ranks: layer fc\.weight: rank 0 has "
                      r"[0-9a-f]{16}, rank 1 has [0-9a-f]{16} \(1 of 2 layers differ\)$"),
    (faults.bug_on_one_rank, r"^\[faults-prune\] rank 1: ZeroDivisionError: division by zero; "
                             r"traceback in .*/logs/rank1\.log$"),
]


@pytest.mark.parametrize("fn,message", CASES, ids=[c[0].__name__ for c in CASES])
def test_a_ranks_own_error_is_one_line_and_never_retried(tmp_path, fn, message):
    logs = tmp_path / "logs"
    lines = []
    t0 = time.monotonic()
    with pytest.raises(StageFailed) as got:
        run_stage_on_ray(fn, {}, _cluster(tmp_path), "faults-prune", logs, lines.append)
    took = time.monotonic() - t0
    text = str(got.value)
    assert "\n" not in text and re.search(message, text), text
    assert got.value.__cause__ is None and got.value.__suppress_context__  # nothing chained to print
    assert _starts(logs) == {0: 1, 1: 1}, "the worker group was started again for an error a restart cannot cure"
    assert not any("restarting" in s for s in lines), lines
    assert took < 60, f"{took:.0f} s"
    if fn is faults.diverged:
        assert lines == ["checking the masks"]  # rank 0's console line reached the driver, once
    if fn is faults.bug_on_one_rank:  # the named log holds the worker's traceback
        assert "Traceback (most recent call last)" in (logs / "rank1.log").read_text()


def test_a_lost_worker_restarts_the_group_up_to_max_failures(tmp_path):
    logs = tmp_path / "logs"
    lines = []
    with pytest.raises(StageFailed) as got:
        run_stage_on_ray(faults.lost, {}, _cluster(tmp_path, max_failures=1), "faults-lost", logs, lines.append)
    text = str(got.value)
    assert "\n" not in text, text
    assert text.startswith("[faults-lost] workers lost 2 times (ray.max_failures: 1); last: "), text
    assert _starts(logs)[1] == 2  # the first start and one restart
    assert [s for s in lines if "restarting the worker group (1 of ray.max_failures: 1)" in s], lines


def _pipeline(tmp: Path, stages: list[dict], limit: int = 400) -> Path:
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "name": "faults", "seed": 0, "model": {"name": "smallcnn"},
        "data": {"name": "fashion-mnist", "batch_size": 100, "limit_train": limit, "limit_test": 200},
        "stages": stages}))
    return path


def _cluster_file(tmp: Path) -> Path:
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump({"name": "faults", "kind": "ray", "device": "cpu", "threads": 1,
                                    "ray": {"num_workers": 2, "cpus_per_worker": 1, "storage_path": str(tmp / "ray")},
                                    "deepspeed": {"zero_stage": 2}}))
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_the_command_line_on_ray_prints_one_line_per_epoch_and_one_line_per_error(tmp_path, capfd):
    """`run` on the embedded cluster: epoch lines once each, no third-party line on the console
    (it is in RUN_DIR/logs); then a resume point of another optimizer-step batch (left by one
    process accumulating 2 micro-batches a step) is one line and exit 2, the run directory
    otherwise as it was, and a loss that becomes NaN one line and exit 1 — each worker group started once."""
    out = tmp_path / "run"
    dense = [{"name": "dense_pretrain", "epochs": 2, "optimizer": {"lr": 0.05}}]
    assert main(["run", str(_pipeline(tmp_path, dense)), "--cluster", str(_cluster_file(tmp_path)),
                 "--out", str(out)]) == 0
    o, e = capfd.readouterr()
    epoch_lines = [s for s in o.splitlines() if re.match(r"\[dense_pretrain\] epoch \d/2 loss", s)]
    assert len(epoch_lines) == 2 and len(set(epoch_lines)) == 2, o
    assert e == "", e  # nothing on stderr: DeepSpeed's and torch's warnings are in the logs
    for noise in ("RayTrainWorker", "TrainController", "untested optimizer", "shm_comm_op", "Warning", "WARNING"):
        assert noise not in o, (noise, o)
    logs = (out / "logs" / "dense_pretrain" / "rank0.log").read_text()
    assert "untested optimizer" in logs  # DeepSpeed's warning went where the user can find it
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["dense_pretrain", "driver.log"]

    # the learning rate jumps ×1e30 half-way: the loss becomes NaN in epoch 2 (on every rank; DeepSpeed skips
    # steps with non-finite gradients, so it takes weights large enough to overflow the logits)
    nan = [{"name": "dense_pretrain", "epochs": 2, "optimizer": {"lr": 0.05},
            "lr_schedule": {"name": "step", "milestones": [0.5], "gamma": 1.0e30}}]
    pipe = _pipeline(tmp_path, nan)
    # one process, twice the examples per step, stops in epoch 2 and keeps the resume point after epoch 1 …
    single = tmp_path / "single.yaml"
    single.write_text(yaml.safe_dump({"name": "single", "kind": "single", "device": "cpu", "threads": 1,
                                      "gradient_accumulation": 2}))
    out2 = tmp_path / "run2"
    assert main(["run", str(pipe), "--cluster", str(single), "--out", str(out2)]) == 1
    assert (out2 / "dense_pretrain" / "resume" / "epoch-1" / "MANIFEST.json").is_file()
    before = {k: v for k, v in _tree(out2).items() if not k.startswith("logs/")}
    capfd.readouterr()
    # … which two workers refuse to resume from: one line, exit 2, nothing else changed
    t0 = time.monotonic()
    assert main(["run", str(pipe), "--cluster", str(_cluster_file(tmp_path)), "--out", str(out2)]) == 2
    o, e = capfd.readouterr()
    assert time.monotonic() - t0 < 60
    err = e.strip()
    assert "\n" not in err and re.match(r"elastictrain: error: .*/dense_pretrain/resume/epoch-1: this resume point "
                                        r"belongs to a different step_batch; ", err), err
    assert "Traceback" not in o + e
    assert {k: v for k, v in _tree(out2).items() if not k.startswith("logs/")} == before
    assert _starts(out2 / "logs" / "dense_pretrain") == {0: 1, 1: 1}

    # the same NaN on two workers: one line, exit 1, as on one process
    out3 = tmp_path / "run3"
    capfd.readouterr()
    assert main(["run", str(pipe), "--cluster", str(_cluster_file(tmp_path)), "--out", str(out3)]) == 1
    o, e = capfd.readouterr()
    err = e.strip()
    assert "\n" not in err and err.startswith("elastictrain: stage failed: [dense_pretrain] stopped in epoch 2: "
                                              "the loss became NaN/Inf at step"), err
    assert "Traceback" not in o + e
    assert _starts(out3 / "logs" / "dense_pretrain") == {0: 1, 1: 1}
    assert not (out3 / "dense_pretrain" / "checkpoint.pt").exists()
