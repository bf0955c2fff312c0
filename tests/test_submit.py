"""Submission to a real Slurm controller on loopback (slurm/ci/start-slurm.sh: Debian's slurmctld,
slurmd and munge, started by hand — installed first when missing).

- the quickstart pipeline (its four stages, specs and enforcement; fewer images and steps via
  ``--set``) submitted to the local Slurm runs as chained jobs; a stage made to fail (its output
  folder is a file) cancels the stages after it; resubmission after the fix runs only the
  remaining stages, and the final report equals a local run's;
- the 2-node × 8-GPU example's scripts pass ``sbatch --test-only`` against the controller, whose
  partition ``gpu`` advertises two such nodes — and a script asking for more is refused;
- ``--dry-run`` renders without submitting; bad cluster configs are one-line errors.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from elastictrain.config import ConfigError
from jobs.cluster import load_cluster
from pipeline.cli import main
from pipeline.submit import status, submit

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _slurm_up() -> bool:
    return shutil.which("scontrol") is not None and "UP" in subprocess.run(
        ["scontrol", "ping"], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged needs root (slurm/ci/start-slurm.sh)")
    was_up = _slurm_up()
    subprocess.run(["bash", str(ROOT / "slurm/ci/start-slurm.sh")], check=True, timeout=300)
    yield
    if not was_up:  # stop only what this module started
        subprocess.run(["bash", str(ROOT / "slurm/ci/stop-slurm.sh")], timeout=120)


QUICKSTART = ROOT / "configs/experiments/quickstart.yaml"
# the quickstart's four stages, specs and enforcement as they are; fewer images and steps
FAST = ["data.limit_train=1000", "data.limit_test=500", "data.batch_size=100", "stages.*.epochs=1",
        "stages.progressive_prune.enforce.update_every=3", "stages.quantize.enforce.refit_every=3",
        "stages.finetune.enforce.refit_every=3"]


def _wait(run_dir: Path, timeout: float = 400) -> list[dict]:
    end = time.monotonic() + timeout
    while True:
        rows = status(run_dir, log=lambda s: None)
        if all(r["state"] in ("FINISHED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
               for r in rows):
            return rows
        if time.monotonic() > end:
            pytest.fail(f"jobs did not finish in {timeout} s: {rows}")
        time.sleep(2)


@pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_chained_jobs_failure_cancels_the_rest_and_resubmission_finishes(slurm, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "progressive_prune").write_text("a file where the stage's folder should be")  # the fault
    jobs = submit(QUICKSTART, ROOT / "configs/clusters/slurm-local.yaml", str(run_dir), log=lambda s: None,
                  overrides=FAST)
    assert list(jobs) == ["dense_pretrain", "progressive_prune", "quantize", "finetune"]
    scripts = {s: (run_dir / "submit" / f"{s}.sbatch").read_text() for s in jobs}
    assert "--stages quantize" in scripts["quantize"] and str(run_dir / "submit/pipeline.yaml") in scripts["quantize"]
    rows = {r["stage"]: r["state"] for r in _wait(run_dir)}
    assert rows == {"dense_pretrain": "FINISHED", "progressive_prune": "FAILED", "quantize": "CANCELLED",
                    "finetune": "CANCELLED"}, rows
    # dependencies were real: the cancelled jobs never started (no output of theirs)
    assert not (run_dir / "quantize").exists()

    (run_dir / "progressive_prune").unlink()  # the fix; resubmit: only the remaining stages
    again = submit(QUICKSTART, ROOT / "configs/clusters/slurm-local.yaml", str(run_dir), log=lambda s: None,
                   overrides=FAST)
    assert list(again) == ["progressive_prune", "quantize", "finetune"]
    assert {r["stage"]: r["state"] for r in _wait(run_dir)} == dict.fromkeys(jobs, "FINISHED")
    record = json.loads((run_dir / "submit" / "jobs.json").read_text())
    assert record["jobs"]["dense_pretrain"]["id"] == jobs["dense_pretrain"]  # the first job is still on record

    # the same pipeline run here, one process on one thread as in the job: the same final report
    local = tmp_path / "local"
    clu = tmp_path / "single1.yaml"
    clu.write_text(yaml.safe_dump({"name": "single1", "kind": "single", "device": "cpu", "threads": 1}))
    assert main(["run", str(QUICKSTART), "--cluster", str(clu), "--out", str(local)]
                + [a for o in FAST for a in ("--set", o)]) == 0
    assert ((local / "pipeline.yaml").read_text().split("\n", 1)[1]
            == (run_dir / "pipeline.yaml").read_text().split("\n", 1)[1])
    a = json.loads((run_dir / "finetune" / "report.json").read_text())
    b = json.loads((local / "finetune" / "report.json").read_text())
    for key in ("top1", "top5", "nonzeros", "nominal_compression", "storage_bits", "artifact_weights_bytes"):
        assert a[key] == b[key], key


@pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_a_requeued_stage_resumes_from_its_last_epoch(slurm, tmp_path):
    """Preemption as Slurm does it: ``scontrol requeue`` kills the running job and queues it again
    (``#SBATCH --requeue``); the job runs the same command, which resumes the stage."""
    run_dir = tmp_path / "run"
    jobs = submit(QUICKSTART, ROOT / "configs/clusters/slurm-local.yaml", str(run_dir), log=lambda s: None,
                  overrides=["stages=[{name: dense_pretrain, epochs: 5}]", "data.limit_train=3000",
                             "data.limit_test=300", "data.batch_size=100"])
    job = jobs["dense_pretrain"]
    manifest = run_dir / "dense_pretrain" / "resume" / "epoch-1" / "MANIFEST.json"
    end = time.monotonic() + 300
    while not manifest.is_file():
        assert time.monotonic() < end, "no resume point appeared"
        time.sleep(0.1)
    subprocess.run(["scontrol", "requeue", job], check=True)
    # a requeued job waits out a begin-time delay (~2 minutes) once it is pending again; release it
    # then — an update sent while the job is still being requeued is overwritten by that delay
    for _ in range(300):
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True,
                               text=True).stdout.split()
        if state[:1] == ["RUNNING"] or (state[:1] == ["PENDING"] and "BeginTime" not in state):
            break
        if state[:2] == ["PENDING", "BeginTime"]:
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)
        time.sleep(0.2)
    assert {r["stage"]: r["state"] for r in _wait(run_dir)} == {"dense_pretrain": "FINISHED"}
    log = next((run_dir / "submit").glob(f"dense_pretrain-{job}.out")).read_text()
    assert "DUE TO JOB REQUEUE" in log and log.count(f"job {job} on") == 2, log[-3000:]
    report = json.loads((run_dir / "dense_pretrain" / "report.json").read_text())
    assert report["resumed"]["epoch"] >= 1 and [h["epoch"] for h in report["history"]] == [1, 2, 3, 4, 5]
    assert f"resumed after epoch {report['resumed']['epoch']}/5" in log


def test_2x8gpu_scripts_pass_sbatch_test_only(slurm, tmp_path):
    from jobs.slurm import render, sbatch

    for _ in range(60):  # the advertised GPU nodes register a few seconds after the controller starts
        if subprocess.run(["sinfo", "-h", "-p", "gpu", "-o", "%t"],
                          capture_output=True, text=True).stdout.split() == ["idle"]:
            break
        time.sleep(1)
    cluster = load_cluster(ROOT / "configs/clusters/slurm-2x8gpu.yaml")
    pipe = ROOT / "configs/experiments/quickstart.yaml"

    def verdict(**change) -> str:
        for k, v in change.items():
            setattr(cluster.slurm, k, v)
        script = tmp_path / "stage.sbatch"
        script.write_text(render(cluster, pipe, tmp_path / "run", "dense_pretrain", "quickstart", tmp_path / "c.yaml"))
        return sbatch(script, test_only=True)

    ok = verdict()
    assert "to start" in ok and "et-gpu[1-2]" in ok and "partition gpu" in ok, ok
    assert "not available" in verdict(gpus_per_node=9)  # more GPUs than a node has: refused
    assert "to start" not in verdict(gpus_per_node=8, nodes=3)  # more nodes than the partition has


def test_dry_run_renders_without_submitting(tmp_path, capsys):
    path = ROOT / "configs/experiments/quickstart.yaml"
    assert main(["submit", str(path), "--cluster", str(ROOT / "configs/clusters/slurm-2x8gpu.yaml"),
                 "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("#SBATCH --nodes=2") == 4 and out.count("#SBATCH --gpus-per-node=8") == 4
    assert "source " in out and "slurm/ray-cluster.sh" in out and "num_workers: 16" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cluster,message", [
    ({"kind": "slurm"}, "slurm: kind: slurm needs a slurm section"),
    ({"kind": "slurm", "slurm": {"nodes": 0}}, "slurm.nodes: must be >= 1"),
    ({"kind": "slurm", "slurm": {"time": "forever"}}, "slurm.time: must be [D-]HH[:MM[:SS]]"),
    ({"kind": "slurm", "slurm": {"sbatch": ["exclusive"]}}, "slurm.sbatch[0]: must be one sbatch option"),
    ({"kind": "slurm", "slurm": {"gpus_per_node": 8, "workers_per_node": 3}},
     "slurm.workers_per_node: 3 ranks cannot share 8 GPUs"),
    ({"kind": "slurm", "slurm": {}, "ray": {}}, "ray: a slurm cluster starts its own Ray"),
    ({"kind": "ray", "slurm": {}}, "slurm: only kind: slurm takes a slurm section"),
    ({"kind": "ray", "ray": {}}, "submit needs kind: slurm, or kind: ray with ray.job_server"),
    ({"kind": "slurm", "slurm": {"partiton": "gpu"}}, "slurm.partiton: unknown key"),
])
def test_bad_cluster_for_submit_is_one_line_error(tmp_path, capsys, cluster, message):
    clu = tmp_path / "c.yaml"
    clu.write_text(yaml.safe_dump({"name": "bad", **cluster}))
    assert main(["submit", str(ROOT / "configs/experiments/quickstart.yaml"), "--cluster", str(clu),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_status_without_a_submission_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no submission recorded"):
        status(tmp_path)


def test_resubmitting_while_jobs_are_queued_is_refused_and_every_job_is_on_record(slurm, tmp_path, capsys):
    """Both stage jobs are recorded; held in the queue, a second submit names them and queues nothing;
    ``--force`` submits anyway. The dependent job carries ``--kill-on-invalid-dep=yes`` (the harness's
    controller has no kill_invalid_depend: the failure test above relies on the flag)."""
    run_dir = tmp_path / "run"
    args = ["submit", str(QUICKSTART), "--cluster", str(ROOT / "configs/clusters/slurm-local.yaml"),
            "--out", str(run_dir),
            "--set", "stages=[{name: dense_pretrain, epochs: 1}, {name: again, kind: dense_pretrain, epochs: 1}]"]
    jobs: dict = {}
    try:
        assert main(args) == 0
        jobs = {k: v["id"] for k, v in json.loads((run_dir / "submit" / "jobs.json").read_text())["jobs"].items()}
        assert list(jobs) == ["dense_pretrain", "again"]
        subprocess.run(["scontrol", "hold", ",".join(jobs.values())], check=True)
        show = subprocess.run(["scontrol", "show", "job", jobs["again"]], capture_output=True, text=True).stdout
        assert "KillOInInvalidDependent=Yes" in show, show
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "jobs of this run are still queued or running" in err, err
        assert all(j in err for j in jobs.values()) and "--force" in err
        assert {k: v["id"] for k, v in json.loads((run_dir / "submit" / "jobs.json").read_text())["jobs"].items()} \
            == jobs  # nothing queued, nothing recorded
        assert main(args + ["--force"]) == 0
        forced = json.loads((run_dir / "submit" / "jobs.json").read_text())["jobs"]
        assert set(forced) == set(jobs) and all(forced[k]["id"] != jobs[k] for k in jobs)
    finally:  # nothing of this test stays in the queue
        record = run_dir / "submit" / "jobs.json"
        ids = [v["id"] for v in json.loads(record.read_text()).get("jobs", {}).values()] if record.is_file() else []
        if ids or jobs:
            subprocess.run(["scancel", *jobs.values(), *ids], capture_output=True)


def test_status_without_squeue_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "submit").mkdir()
    (tmp_path / "submit" / "jobs.json").write_text(json.dumps(
        {"kind": "slurm", "stages": ["dense_pretrain"], "jobs": {"dense_pretrain": {"id": "7", "submitted": 0}}}))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no squeue anywhere
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("elastictrain: error: squeue: not found"), err
