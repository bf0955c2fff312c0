"""A pipeline submitted to a two-node Slurm cluster, for real: slurmctld here, one slurmd in each of
two network namespaces of ``tests/hosts.py`` (slurm/ci/start-slurm-hosts.sh), the shared
filesystem as the cluster's shared storage. Each stage is one two-node job whose script starts Ray
across the allocation with ``slurm/ray-cluster.sh`` (head on et-h0, a worker node on et-h1, each in
a job step), runs the stage as Ray Train workers, one rank per node, and stops what it started.

The chained jobs complete, each stage ran on two ranks on the two nodes' addresses, nothing of Ray
is left on the nodes when the jobs have ended, the masks equal a one-node run's (2 workers of the
in-process Ray, the same global batch) bit for bit and the weights to float tolerance, and the
harness leaves no process and no namespace behind.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import hosts
import pytest
import torch
import yaml

from elastictrain import checkpoint
from jobs.slurm import job_states
from pipeline.submit import LIVE, submit

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else "python"
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
STAGES = ("dense_pretrain", "progressive_prune")
pytestmark = [pytest.mark.skipif(hosts.available() is not None, reason=f"multi-host harness: {hosts.available()}"),
              pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST missing: apt-get install "
                                                              "dataset-fashion-mnist")]


class Harness:
    """The two hosts and the Slurm cluster on them; ``close()`` stops it all (idempotent)."""

    def __init__(self, h: hosts.Hosts, dir: Path):
        self.h, self.dir, self.closed = h, dir, False
        self.env = {**os.environ, "SLURM_HOSTS_DIR": str(dir)}

    def start(self) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "slurm/ci/start-slurm-hosts.sh"), self.h.gateway,
                               *(f"{n}={a}" for n, a in zip(self.h.names, self.h.addrs))],
                              env=self.env, capture_output=True, text=True, timeout=300)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:  # jobs cancelled, daemons stopped by their PIDs (logs stay in the pytest tmp folder)
            subprocess.run(["bash", str(ROOT / "slurm/ci/stop-slurm-hosts.sh")], env=self.env, timeout=120)
        finally:
            self.h.close()  # whatever still runs in the namespaces, then the namespaces


@pytest.fixture(scope="module")
def slurm_hosts(tmp_path_factory):
    if shutil.which("apt-get") is None and not all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch",
                                                                              "munged")):
        pytest.skip("Slurm (slurmctld, slurmd, slurm-client, munge) is not installed and apt-get is missing")
    harness = Harness(hosts.Hosts(2), tmp_path_factory.mktemp("slurm-hosts"))
    try:
        r = harness.start()
        if r.returncode != 0:
            pytest.skip(f"two-node Slurm did not start: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        with pytest.MonkeyPatch.context() as mp:  # sbatch, squeue and the jobs (sbatch exports it) use it
            mp.setenv("SLURM_CONF", str(harness.dir / "slurm.conf"))
            mp.setenv("RAY_AUTH_MODE", "disabled")
            yield harness
    finally:
        harness.close()


def pipeline(tmp: Path) -> Path:
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "name": "slurmhosts", "seed": 0, "model": {"name": "smallcnn"},
        "data": {"name": "fashion-mnist", "batch_size": 100, "limit_train": 2000, "limit_test": 1000},
        "stages": [{"name": "dense_pretrain", "epochs": 1, "optimizer": {"lr": 0.05}},
                   {"name": "progressive_prune", "epochs": 1, "spec": str(ROOT / "configs/specs/smallcnn-prune.yaml"),
                    "optimizer": {"lr": 0.02}, "enforce": {"method": "progressive", "update_every": 4, "end": 0.6}}]}))
    return path


def nodes_of(logs: Path) -> set[str]:
    """The nodes the ranks ran on, from the header line each worker wrote when it started."""
    found = set()
    for r in (0, 1):
        m = re.search(r"^== .* rank \d+ of 2 started \(pid \d+, node ([\d.]+)\)", (logs / f"rank{r}.log").read_text(),
                      re.M)
        assert m, f"{logs / f'rank{r}.log'}: no header line"
        found.add(m.group(1))
    return found


def wait_for(ids: list[str], run_dir: Path, timeout: float = 600) -> dict[str, str]:
    end = time.monotonic() + timeout
    while True:
        states = job_states(ids)
        if len(states) == len(ids) and not any(s in LIVE for s in states.values()):
            return states
        if time.monotonic() > end:
            pytest.fail(f"jobs did not end in {timeout} s: {states}\n{job_logs(run_dir)}")
        time.sleep(1)


def job_logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "submit").glob("*.out")))


def test_a_pipeline_on_two_slurm_nodes_equals_one_node(slurm_hosts, tmp_path):
    h = slurm_hosts.h
    path = pipeline(tmp_path)
    clu = tmp_path / "slurm-hosts.yaml"
    clu.write_text(yaml.safe_dump({"name": "slurm-hosts", "kind": "slurm", "device": "cpu",
                                   "slurm": {"nodes": 2, "cpus_per_node": 1, "time": "00:20:00", "python": PY},
                                   "deepspeed": {"zero_stage": 2}}))
    local = tmp_path / "local.yaml"  # one node: the in-process Ray, 2 workers, the same global batch
    local.write_text(yaml.safe_dump({"name": "local2", "kind": "ray", "device": "cpu", "threads": 1,
                                     "ray": {"address": "local", "num_workers": 2, "cpus_per_worker": 1,
                                             "storage_path": str(tmp_path / "ray-local")},
                                     "deepspeed": {"zero_stage": 2}}))
    run_dir, one = tmp_path / "two-nodes", tmp_path / "one-node"
    t0 = time.monotonic()
    jobs = submit(path, clu, str(run_dir), log=lambda s: None)
    assert list(jobs) == list(STAGES)
    # the one-node run meanwhile (a process of its own: an in-process Ray here would stay for later tests)
    with open(tmp_path / "one-node.log", "w") as out:
        proc = subprocess.Popen([PY, "-m", "pipeline.cli", "run", str(path), "--cluster", str(local),
                                 "--out", str(one)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        states = wait_for(list(jobs.values()), run_dir)
        took = time.monotonic() - t0
        assert states == dict.fromkeys(jobs.values(), "COMPLETED"), f"{states}\n{job_logs(run_dir)}"
        assert proc.wait(timeout=600) == 0, (tmp_path / "one-node.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    inner = yaml.safe_load((run_dir / "submit" / "cluster.yaml").read_text())
    assert inner["ray"]["address"] == "auto" and inner["ray"]["placement"] == "STRICT_SPREAD"
    for stage in STAGES:
        log = (run_dir / "submit" / f"{stage}-{jobs[stage]}.out").read_text()
        assert f"Ray: 2 of 2 nodes up at {h.addrs[0]}:6379" in log, log[-3000:]
        assert yaml.safe_load((run_dir / stage / "report.json").read_text())["world_size"] == 2
        assert nodes_of(run_dir / "logs" / stage) == set(h.addrs), f"{stage}: not one rank on each node"

    # the jobs stopped the Ray they started: only the nodes' slurmd are left on them
    end = time.monotonic() + 15
    while (left := {p: _comm(p) for p in h.pids()}) and set(left.values()) - {"slurmd", None}:
        assert time.monotonic() < end, f"left on the nodes after the jobs ended: {left}"
        time.sleep(0.5)

    for stage in STAGES:
        a, b = (checkpoint.load(d / stage / "checkpoint.pt") for d in (one, run_dir))
        for n, w in a["model_state_dict"].items():
            assert torch.allclose(w, b["model_state_dict"][n], atol=1e-5), f"{stage} {n}"
        ma, mb = checkpoint.buffers(a).get("weight_mask", {}), checkpoint.buffers(b).get("weight_mask", {})
        assert ma.keys() == mb.keys() and all(torch.equal(ma[n], mb[n]) for n in ma), f"{stage}: masks differ"
    assert checkpoint.buffers(b)["weight_mask"], "the pruning stage has masks"

    ctld = int((slurm_hosts.dir / "run" / "slurmctld.pid").read_text())
    slurm_hosts.close()  # (the fixture's teardown, here so that what it leaves can be checked)
    assert not h.pids(), "processes left in the namespaces"
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not set(names) & set(h.names), f"namespaces left: {names}"
    assert _comm(ctld) != "slurmctld", "slurmctld still runs"
    print(f"two nodes: {took:.0f} s for both jobs")


def _comm(pid: int):
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
