"""Submission through a real Ray head's Jobs API (``ray start --head`` on 127.0.0.1, stopped by
this test): one driver job runs the stages in order on the head's Ray Train workers."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.submit import status, submit

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
RAY = Path(sys.executable).with_name("ray")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()  # an in-process Ray of earlier modules: `ray stop --force` below would kill it
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    port, dash = _port(), _port()
    tmp = tmp_path_factory.mktemp("head")
    subprocess.run([str(RAY), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                    "--num-cpus=3", "--disable-usage-stats", f"--temp-dir={tmp / 'ray'}"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        yield port, dash
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_pipeline_through_the_jobs_api(head, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    port, dash = head
    cluster = tmp_path / "ray-head.yaml"
    cluster.write_text(yaml.safe_dump({
        "name": "ray-head", "kind": "ray", "device": "cpu", "threads": 1,
        "ray": {"address": f"127.0.0.1:{port}", "job_server": f"http://127.0.0.1:{dash}", "num_workers": 2,
                "cpus_per_worker": 1, "storage_path": str(tmp_path / "ray"), "python": sys.executable,
                "working_dir": str(ROOT)},
        "deepspeed": {"zero_stage": 2}}))
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text(yaml.safe_dump({
        "name": "jobsapi", "seed": 0, "model": {"name": "smallcnn"},
        "data": {"name": "fashion-mnist", "batch_size": 100, "limit_train": 1000, "limit_test": 500},
        "stages": [{"name": "dense_pretrain", "epochs": 1, "optimizer": {"lr": 0.05}},
                   {"name": "progressive_prune", "epochs": 1, "spec": str(ROOT / "configs/specs/smallcnn-prune.yaml"),
                    "optimizer": {"lr": 0.02}, "enforce": {"method": "progressive", "update_every": 3, "end": 0.6}}]}))
    run_dir = tmp_path / "run"
    jobs = submit(pipe, cluster, str(run_dir), log=lambda s: None)
    assert list(jobs) == ["driver"]
    end = time.monotonic() + 480
    while time.monotonic() < end:
        rows = status(run_dir, log=lambda s: None)
        if all(r["state"] == "FINISHED" for r in rows) or any(r["state"] in ("FAILED", "STOPPED") for r in rows):
            break
        time.sleep(3)
    assert [r["state"] for r in rows] == ["FINISHED", "FINISHED"], rows
    report = json.loads((run_dir / "progressive_prune" / "report.json").read_text())
    assert report["world_size"] == 2 and report["top1"] > 0.2  # trained (chance: 0.1) on 1,000 images
    assert submit(pipe, cluster, str(run_dir), log=lambda s: None) == {}  # nothing left to submit
