"""A stage across two Ray nodes on two hosts (network namespaces of ``tests/hosts.py``): a Ray head
on et-h0, a worker node on et-h1, the driver on et-h0 as on a cluster's head node, the run
directory and Ray Train's storage on the shared filesystem. The ranks are placed one per node
(``placement: STRICT_SPREAD``) and talk gloo over the bridge; the result equals the same pipeline
on one node (the in-process Ray)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import hosts
import pytest
import torch
import yaml

from elastictrain import checkpoint
from pipeline.config import load_cluster, read_pipeline
from pipeline.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else "python"
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = [pytest.mark.skipif(hosts.available() is not None, reason=f"multi-host harness: {hosts.available()}"),
              pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST missing")]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
# the head declares a node dead after 3 missed health checks 1 s apart (Ray's default: 5 × 3 s)
HEAD_ENV = {**ENV, "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
PORT = 6379


def ray_start(h: hosts.Hosts, i: int, *args: str) -> None:
    r = h.run(i, [PY, "-m", "ray.scripts.scripts", "start", f"--node-ip-address={h.addrs[i]}", "--disable-usage-stats",
                  "--object-store-memory=200000000", *args], env=HEAD_ENV if "--head" in args else ENV,
              capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def alive_nodes(h: hosts.Hosts) -> int:
    r = h.run(0, [PY, "-c", f"import ray; ray.init(address='{h.addrs[0]}:{PORT}', logging_level='ERROR'); "
                            "print(sum(n['Alive'] for n in ray.nodes()))"], env=ENV, capture_output=True, text=True,
              timeout=60)
    return int(r.stdout.strip() or 0)


@pytest.fixture(scope="module")
def ray_hosts():
    """Two hosts, each a 1-CPU Ray node (the head on the first; Ray Train's controller takes no
    CPU): room for one worker per node. Everything is removed afterwards."""
    with hosts.Hosts(2, net=8) as h:  # (test_slurm_hosts' harness uses the default set)
        ray_start(h, 0, "--head", f"--port={PORT}", "--num-cpus=1", "--include-dashboard=true",
                  f"--dashboard-host={h.addrs[0]}")
        ray_start(h, 1, f"--address={h.addrs[0]}:{PORT}", "--num-cpus=1")
        end = time.monotonic() + 60
        while alive_nodes(h) < 2:
            assert time.monotonic() < end, "the worker node did not join"
            time.sleep(1)
        yield h
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith(h.prefix)], "a namespace was left behind"


PRUNE = {"name": "progressive_prune", "epochs": 1, "spec": str(ROOT / "configs/specs/smallcnn-prune.yaml"),
         "optimizer": {"lr": 0.02}, "enforce": {"method": "progressive", "update_every": 4, "end": 0.6}}


def pipeline(tmp: Path, stages: list, limit_train: int = 2000) -> Path:
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "name": "hosts", "seed": 0, "model": {"name": "smallcnn"},
        "data": {"name": "fashion-mnist", "batch_size": 100, "limit_train": limit_train, "limit_test": 1000},
        "stages": stages}))
    return path


def cluster(tmp: Path, address: str, placement: str = "PACK", **ray) -> Path:
    path = tmp / f"cluster-{placement}{'-elastic' if ray else ''}.yaml"
    path.write_text(yaml.safe_dump({
        "name": "hosts", "kind": "ray", "device": "cpu", "threads": 1,
        "ray": {"address": address, "num_workers": 2, "cpus_per_worker": 1, "placement": placement,
                "storage_path": str(tmp / "ray"), **ray}, "deepspeed": {"zero_stage": 2}}))
    return path


def nodes_of(logs: Path) -> dict[int, str]:
    """Each rank's node, from the header line its worker wrote when it started."""
    out = {}
    for r in (0, 1):
        m = re.search(r"^== .* rank \d+ of 2 started \(pid \d+, node ([\d.]+)\)", (logs / f"rank{r}.log").read_text(),
                      re.M)
        out[r] = m.group(1)
    return out


def test_a_stage_across_two_nodes_equals_one_node(ray_hosts, ray_instance, tmp_path):
    h = ray_hosts
    path = pipeline(tmp_path, [PRUNE])  # one stage: each stage pays for starting a worker group
    out = tmp_path / "two-nodes"
    t0 = time.monotonic()
    r = h.run(0, [str(ROOT / ".venv/bin/elastictrain"), "run", str(path), "--cluster",
                  str(cluster(tmp_path, f"{h.addrs[0]}:{PORT}", "STRICT_SPREAD")), "--out", str(out)],
              env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    took = time.monotonic() - t0
    assert set(nodes_of(out / "logs" / "progressive_prune").values()) == set(h.addrs), "not one rank per node"
    # Ray Train's copy of the checkpoint went to the configured shared storage
    assert list((tmp_path / "ray").glob("hosts-progressive_prune-*/checkpoint_*/checkpoint.pt"))

    one = tmp_path / "one-node"  # the same pipeline on one node (the in-process Ray, 2 workers)
    source = read_pipeline(path)
    run_pipeline(source.cfg, load_cluster(cluster(tmp_path, "local")), one, log=lambda s: None, source=source)
    a, b = (checkpoint.load(d / "progressive_prune" / "checkpoint.pt") for d in (one, out))
    for n, w in a["model_state_dict"].items():
        assert torch.allclose(w, b["model_state_dict"][n], atol=1e-5), n
    ma, mb = checkpoint.buffers(a)["weight_mask"], checkpoint.buffers(b)["weight_mask"]
    assert ma and ma.keys() == mb.keys() and all(torch.equal(ma[n], mb[n]) for n in ma), "masks differ"
    print(f"two nodes: {took:.0f} s")


def test_a_node_lost_mid_stage_the_stage_finishes_on_the_rest(ray_hosts, ray_instance, tmp_path):
    """Elastic: ``min_workers: 1``. The worker node's host fails (every process on it SIGKILLed)
    after the first epoch; the driver restarts the stage on the one worker left, which resumes
    the two workers' resume point accumulating 2 micro-batches a step — the same examples, crops,
    dropout and BatchNorm batches in every step. Against an uninterrupted two-worker run: masks and
    codebooks equal at the step it resumed from (fingerprints), and after three more epochs on
    one worker the runs differ only by float rounding (summation order): the same losses to
    1e-3, masks equal but for a rare tie at the pruning threshold, the same accuracy."""
    h = ray_hosts
    stages = [{**PRUNE, "name": "prune", "kind": "progressive_prune", "epochs": 4}]
    path = pipeline(tmp_path, stages, limit_train=4000)
    out = tmp_path / "elastic"
    driver = h.popen(0, [str(ROOT / ".venv/bin/elastictrain"), "run", str(path), "--cluster",
                         str(cluster(tmp_path, f"{h.addrs[0]}:{PORT}", "SPREAD", min_workers=1)), "--out", str(out)],
                     env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        manifest = out / "prune" / "resume" / "epoch-1" / "MANIFEST.json"
        end = time.monotonic() + 300
        while not manifest.is_file() and driver.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert manifest.is_file() and driver.poll() is None, f"no resume point before the stage ended: " \
                                                             f"{driver.stdout.read() if driver.poll() else ''}"
        assert h.crash(1) > 0
        console, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, console[-3000:]
    assert "a worker was lost" in console and "saved by 2 ranks; now 1 × 2 micro-batches a step" in console, console
    report = json.loads((out / "prune" / "report.json").read_text())
    sizes = [e["world_size"] for e in report["history"]]
    assert sizes[0] == 2 and sizes[-1] == 1 and [e["epoch"] for e in report["history"]] == [1, 2, 3, 4], sizes
    assert report["resumed"]["world_size_saved"] == 2 and report["resumed"]["world_size"] == 1

    straight = tmp_path / "straight"  # the same stage, uninterrupted, on two workers (one node)
    source = read_pipeline(path)
    run_pipeline(source.cfg, load_cluster(cluster(tmp_path, "local")), straight, log=lambda s: None, source=source)
    ref = json.loads((straight / "prune" / "report.json").read_text())
    assert report["history"][0]["checksum"] == ref["history"][0]["checksum"] == report["resumed"]["checksum_restored"]
    for e, r in zip(report["history"], ref["history"]):
        assert abs(e["loss"] - r["loss"]) <= 1e-3 * r["loss"], (e, r)
    a, b = (checkpoint.load(d / "prune" / "checkpoint.pt") for d in (straight, out))
    ma, mb = checkpoint.buffers(a)["weight_mask"], checkpoint.buffers(b)["weight_mask"]
    differ = sum(int((ma[n] != mb[n]).sum()) for n in ma)
    assert differ <= 1e-5 * sum(m.numel() for m in ma.values()), f"{differ} mask entries differ"
    assert [int(m.sum()) for m in ma.values()] == [int(m.sum()) for m in mb.values()]
    assert abs(report["top1"] - ref["top1"]) <= 0.005
    print(f"elastic: {differ} mask entries of {sum(m.numel() for m in ma.values())} differ after 3 epochs on 1 worker")
