"""A stage across two Ray nodes on two hosts (network namespaces of ``tests/hosts.py``): a Ray head
on et-h0, a worker node on et-h1, the driver on et-h0 as on a cluster's head node, the run
directory and Ray Train's storage on the shared filesystem. The ranks are placed one per node
(``placement: STRICT_SPREAD``) and talk gloo over the bridge; the result equals the same pipeline
on one node (the in-process Ray)."""
from __future__ import annotations

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
PORT = 6379


def ray_start(h: hosts.Hosts, i: int, *args: str) -> None:
    r = h.run(i, [PY, "-m", "ray.scripts.scripts", "start", f"--node-ip-address={h.addrs[i]}", "--disable-usage-stats",
                  "--object-store-memory=200000000", *args], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def alive_nodes(h: hosts.Hosts) -> int:
    r = h.run(0, [PY, "-c", f"import ray; ray.init(address='{h.addrs[0]}:{PORT}', logging_level='ERROR'); "
                            "print(sum(n['Alive'] for n in ray.nodes()))"], env=ENV, capture_output=True, text=True,
              timeout=60)
    return int(r.stdout.strip() or 0)


@pytest.fixture(scope="module")
def ray_hosts():
    """Two hosts, a Ray head on the first (2 CPUs: a worker and Ray Train's controller), a 1-CPU
    worker node on the second; everything removed afterwards."""
    with hosts.Hosts(2, net=8) as h:  # (test_slurm_hosts' harness uses the default set)
        ray_start(h, 0, "--head", f"--port={PORT}", "--num-cpus=2", "--include-dashboard=true",
                  f"--dashboard-host={h.addrs[0]}")
        ray_start(h, 1, f"--address={h.addrs[0]}:{PORT}", "--num-cpus=1")
        end = time.monotonic() + 60
        while alive_nodes(h) < 2:
            assert time.monotonic() < end, "the worker node did not join"
            time.sleep(1)
        yield h
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith(h.prefix)], "a namespace was left behind"


def pipeline(tmp: Path) -> Path:
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "name": "hosts", "seed": 0, "model": {"name": "smallcnn"},
        "data": {"name": "fashion-mnist", "batch_size": 100, "limit_train": 2000, "limit_test": 1000},
        "stages": [{"name": "dense_pretrain", "epochs": 1, "optimizer": {"lr": 0.05}},
                   {"name": "progressive_prune", "epochs": 1, "spec": str(ROOT / "configs/specs/smallcnn-prune.yaml"),
                    "optimizer": {"lr": 0.02}, "enforce": {"method": "progressive", "update_every": 4, "end": 0.6}}]}))
    return path


def cluster(tmp: Path, address: str, placement: str = "PACK") -> Path:
    path = tmp / f"cluster-{placement}.yaml"
    path.write_text(yaml.safe_dump({
        "name": "hosts", "kind": "ray", "device": "cpu", "threads": 1,
        "ray": {"address": address, "num_workers": 2, "cpus_per_worker": 1, "placement": placement,
                "storage_path": str(tmp / "ray")}, "deepspeed": {"zero_stage": 2}}))
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
    path = pipeline(tmp_path)
    out = tmp_path / "two-nodes"
    t0 = time.monotonic()
    r = h.run(0, [str(ROOT / ".venv/bin/elastictrain"), "run", str(path), "--cluster",
                  str(cluster(tmp_path, f"{h.addrs[0]}:{PORT}", "STRICT_SPREAD")), "--out", str(out)],
              env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    took = time.monotonic() - t0
    for stage in ("dense_pretrain", "progressive_prune"):
        assert set(nodes_of(out / "logs" / stage).values()) == set(h.addrs), f"{stage}: not one rank per node"
    # Ray Train's copy of the checkpoint went to the configured shared storage
    assert list((tmp_path / "ray").glob("hosts-progressive_prune-*/checkpoint_*/checkpoint.pt"))

    one = tmp_path / "one-node"  # the same pipeline on one node (the in-process Ray, 2 workers)
    source = read_pipeline(path)
    run_pipeline(source.cfg, load_cluster(cluster(tmp_path, "local")), one, log=lambda s: None, source=source)
    for stage in ("dense_pretrain", "progressive_prune"):
        a, b = (checkpoint.load(d / stage / "checkpoint.pt") for d in (one, out))
        for n, w in a["model_state_dict"].items():
            assert torch.allclose(w, b["model_state_dict"][n], atol=1e-5), f"{stage} {n}"
        ma, mb = checkpoint.buffers(a)["weight_mask"], checkpoint.buffers(b)["weight_mask"]
        assert ma.keys() == mb.keys() and all(torch.equal(ma[n], mb[n]) for n in ma), f"{stage}: masks differ"
    print(f"two nodes: {took:.0f} s")
