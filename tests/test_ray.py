"""Stages on 2 Ray Train workers (in-process Ray on loopback, one instance for this module), each
a DeepSpeed engine over gloo: outputs satisfy their specs, every constraint update was checked
identical across ranks, ZeRO 0 (with sparse-aware reduction) and ZeRO 2 agree, constrained
stages run under ZeRO-3 (sharded weights), and the distributed run — ZeRO 0 and ZeRO 3 — matches
a single process on the same global batch."""
import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from elastictrain import checkpoint
from elastictrain.constraints.plan import resolve
from elastictrain.constraints.spec import load as load_spec
from elastictrain.constraints.verify import verify
from pipeline.config import ClusterConfig, load_cluster, read_pipeline
from pipeline.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.is_file(),
                                reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
PRUNE = str(ROOT / "configs/specs/smallcnn-prune.yaml")
MIXTURE = str(ROOT / "configs/specs/smallcnn-mixture.yaml")


@pytest.fixture(autouse=True)
def _ray(ray_instance):  # conftest's, shared with test_ray_failures
    return ray_instance


def test_local_ray_binds_to_loopback(ray_instance):
    assert {n["NodeManagerAddress"] for n in ray_instance.nodes()} == {"127.0.0.1"}
    dashboard = ray_instance._private.worker.global_worker.node.address_info["webui_url"]
    assert dashboard.startswith("127.0.0.1:"), dashboard


def cluster(tmp: Path, zero: int, sparse: bool = False, accumulation: int = 1) -> ClusterConfig:
    path = tmp / f"zero{zero}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"test-zero{zero}", "kind": "ray", "device": "cpu", "threads": 1,
        "ray": {"address": "local", "num_workers": 2, "cpus_per_worker": 1, "storage_path": str(tmp / "ray")},
        "gradient_accumulation": accumulation, "deepspeed": {"zero_stage": zero, "sparse_reduce": sparse}}))
    return load_cluster(path)


def pipeline(tmp: Path, model="smallcnn", stages=None, batch=100, augment=True, tracking=None) -> Path:
    cfg = {"name": "raytest", "seed": 0, "model": {"name": model}, **({"tracking": tracking} if tracking else {}),
           "data": {"name": "fashion-mnist", "batch_size": batch, "limit_train": 2000, "limit_test": 1000,
                    "augment": augment},
           "stages": stages or [
               {"name": "dense_pretrain", "epochs": 1, "optimizer": {"lr": 0.05}},
               {"name": "progressive_prune", "epochs": 1, "spec": PRUNE, "optimizer": {"lr": 0.02},
                "enforce": {"method": "progressive", "update_every": 4, "end": 0.6}},
               {"name": "quantize", "epochs": 1, "spec": MIXTURE, "optimizer": {"lr": 0.01, "weight_decay": 0.0},
                "enforce": {"method": "fixed", "refit_every": 5}}]}
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(path: Path, clu, out: Path, only=None):
    source = read_pipeline(path)
    return run_pipeline(source.cfg, clu, out, only=only, log=lambda s: None, source=source)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero2")
    path = pipeline(tmp, tracking={"wandb": {"mode": "offline", "log_every": 5}})
    return tmp, path, run(path, cluster(tmp, 2), tmp / "out")


def test_stages_on_two_workers_write_verified_reports(zero2_run):
    tmp, path, reports = zero2_run
    assert [r["stage"] for r in reports] == ["dense_pretrain", "progressive_prune", "quantize"]
    assert all(r["world_size"] == 2 for r in reports)
    assert reports[0]["top1"] > 0.4
    for r, spec in zip(reports[1:], (PRUNE, MIXTURE)):
        ck = checkpoint.load(tmp / "out" / r["stage"] / "checkpoint.pt")
        sd = ck["model_state_dict"]
        plans = resolve(load_spec(spec), {k: tuple(v.shape) for k, v in sd.items()})
        assert verify(plans, sd, checkpoint.buffers(ck)["pattern_library"]) == []
        assert r["constraint_stats"]["mask_updates"] >= 1  # each update was checked across ranks
    # Ray Train's own checkpoint carries the full constraint state
    ray_ckpts = sorted((tmp / "ray").glob("raytest-quantize-*/checkpoint_*/checkpoint.pt"))
    assert ray_ckpts
    buf = checkpoint.buffers(checkpoint.load(ray_ckpts[-1]))
    assert buf["weight_mask"] and buf["quantization_table"] and buf["pattern_library"]


def test_only_rank_0_tracks(zero2_run):
    from wandb_file import read_run

    tmp, _, reports = zero2_run
    runs = [read_run(f) for f in sorted((tmp / "out" / "wandb").glob("offline-run-*/run-*.wandb"))]
    assert sorted(r["run"]["job_type"] for r in runs) == ["dense_pretrain", "progressive_prune", "quantize"]
    for r, rep in zip(sorted(runs, key=lambda r: ["dense_pretrain", "progressive_prune", "quantize"].index(
            r["run"]["job_type"])), reports):
        assert r["config"]["world_size"] == 2 and r["config"]["cluster"]["ray"]["num_workers"] == 2
        assert [h["test/top1"] for h in r["history"] if "test/top1" in h] == [pytest.approx(rep["top1"])]
        # 20 global steps of 100 images (50 per worker), logged every 5 — once, not once per worker
        assert [h["train/epoch"] for h in r["history"] if "train/loss" in h] == [0.25, 0.5, 0.75, 1.0]


def test_zero0_with_sparse_reduction_agrees_with_zero2(zero2_run):
    tmp, path, _ = zero2_run
    out0 = tmp / "out0"
    (out0 / "dense_pretrain").mkdir(parents=True)
    src = tmp / "out" / "dense_pretrain"
    for f in ("checkpoint.pt", "report.json"):
        (out0 / "dense_pretrain" / f).write_bytes((src / f).read_bytes())
    run(path, cluster(tmp, 0, sparse=True), out0, only=["dense_pretrain", "progressive_prune"])
    a = checkpoint.load(tmp / "out" / "progressive_prune" / "checkpoint.pt")
    b = checkpoint.load(out0 / "progressive_prune" / "checkpoint.pt")
    ma, mb = checkpoint.buffers(a)["weight_mask"], checkpoint.buffers(b)["weight_mask"]
    agree = sum(int((ma[n] == mb[n]).sum()) for n in ma) / sum(ma[n].numel() for n in ma)
    assert agree > 0.999, agree
    for n in ma:
        both = ma[n] & mb[n]
        assert torch.allclose(a["model_state_dict"][n][both], b["model_state_dict"][n][both], atol=1e-3)


LENET_STAGES = [{"name": "dense_pretrain", "epochs": 1, "optimizer": {"lr": 0.01, "momentum": 0.0}},
                {"name": "progressive_prune", "epochs": 1, "spec": str(ROOT / "configs/specs/lenet5-test.yaml"),
                 "optimizer": {"lr": 0.01, "momentum": 0.0},
                 "enforce": {"method": "progressive", "update_every": 5, "end": 0.5}}]


@pytest.fixture(scope="module")
def lenet_single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lenet_single")
    # no augmentation, no BatchNorm (LeNet-5): the global batch of 200 is 2 × 100 on two ranks
    path = pipeline(tmp, model="lenet5", stages=LENET_STAGES, batch=200, augment=False)
    single = tmp / "single.yaml"  # on the CPU, as the workers are (single.yaml would take a GPU where there is one)
    single.write_text(yaml.safe_dump({"name": "cpu", "kind": "single", "device": "cpu"}))
    run(path, load_cluster(single), tmp / "out")
    return tmp / "out"


@pytest.mark.parametrize("zero,accumulation", [(0, 1), (3, 1), (0, 2)])
def test_two_workers_match_one_process_on_the_same_global_batch(tmp_path, lenet_single, zero, accumulation):
    """ZeRO-3: the masks come from the sharded projection (exact distributed top-k), yet equal the
    single process's — the weights agree to float tolerance and the non-zero counts exactly.
    Accumulation 2 over global batches of 100 (with the sparse-aware reduction, at each step's
    boundary) trains like one process's batch of 200: same steps, LR schedule and mask updates."""
    dist = pipeline(tmp_path, model="lenet5", stages=LENET_STAGES, batch=200 // accumulation, augment=False)
    run(dist, cluster(tmp_path, zero, sparse=accumulation > 1, accumulation=accumulation), tmp_path / "out")
    for stage in ("dense_pretrain", "progressive_prune"):
        a = checkpoint.load(lenet_single / stage / "checkpoint.pt")["model_state_dict"]
        b = checkpoint.load(tmp_path / "out" / stage / "checkpoint.pt")["model_state_dict"]
        for n in a:
            assert torch.allclose(a[n], b[n], atol=2e-5, rtol=1e-4), f"{stage} {n}: {float((a[n] - b[n]).abs().max())}"
    rs = json.loads((lenet_single / "progressive_prune" / "report.json").read_text())
    rd = json.loads((tmp_path / "out" / "progressive_prune" / "report.json").read_text())
    assert rs["nonzeros"] == rd["nonzeros"] and abs(rs["top1"] - rd["top1"]) <= 0.002
    assert rs["constraint_stats"]["mask_updates"] == rd["constraint_stats"]["mask_updates"]
    assert [h["steps"] for h in rs["history"]] == [h["steps"] for h in rd["history"]]


def test_zero3_prune_and_quantize_stages(zero2_run):
    """Constrained stages under ZeRO-3 (weights sharded): the ZeRO-3 specs' outputs pass verify and
    every update was rank-checked; starts from the ZeRO-2 run's dense checkpoint."""
    tmp, _, _ = zero2_run
    out3 = tmp / "out3"
    (out3 / "dense_pretrain").mkdir(parents=True)
    for f in ("checkpoint.pt", "report.json"):
        (out3 / "dense_pretrain" / f).write_bytes((tmp / "out" / "dense_pretrain" / f).read_bytes())
    prune, mixture = (str(ROOT / f"configs/specs/smallcnn-zero3-{k}.yaml") for k in ("prune", "mixture"))
    (tmp / "z3").mkdir()
    path = pipeline(tmp / "z3", stages=[
        {"name": "dense_pretrain", "epochs": 1, "optimizer": {"lr": 0.05}},
        {"name": "progressive_prune", "epochs": 1, "spec": prune, "optimizer": {"lr": 0.02},
         "enforce": {"method": "progressive", "update_every": 4, "end": 0.6}},
        {"name": "quantize", "epochs": 1, "spec": mixture, "optimizer": {"lr": 0.01, "weight_decay": 0.0},
         "enforce": {"method": "fixed", "refit_every": 5}}])
    reports = run(path, cluster(tmp, 3), out3)
    assert [r["stage"] for r in reports] == ["progressive_prune", "quantize"]
    for r, spec in zip(reports, (prune, mixture)):
        assert r["world_size"] == 2 and r["top1"] > 0.4
        sd = checkpoint.load(out3 / r["stage"] / "checkpoint.pt")["model_state_dict"]
        plans = resolve(load_spec(spec), {k: tuple(v.shape) for k, v in sd.items()})
        assert verify(plans, sd) == []
        assert r["constraint_stats"]["mask_updates"] >= 1
    assert reports[1]["constraint_stats"]["codebook_refits"] >= 1


def test_a_killed_worker_is_restarted_and_the_stage_resumes(tmp_path):
    """SIGKILL one Ray Train worker mid-stage: Ray Train (FailureConfig) restarts the worker group,
    which resumes from the stage's last completed epoch with masks and codebooks bit-identical to
    the saved ones; the run finishes and its output passes verify."""
    import signal
    import subprocess
    import threading

    stages = [{"name": "prune", "kind": "progressive_prune", "epochs": 4, "spec": MIXTURE, "optimizer": {"lr": 0.02},
               "enforce": {"method": "progressive", "update_every": 5, "end": 0.5}}]
    path = pipeline(tmp_path, stages=stages)
    out = tmp_path / "out"
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(reports=run(path, cluster(tmp_path, 2), out)))
    t.start()
    manifest = out / "prune" / "resume" / "epoch-1" / "MANIFEST.json"
    end = time.monotonic() + 300
    while not manifest.is_file() and t.is_alive() and time.monotonic() < end:
        time.sleep(0.05)
    assert manifest.is_file() and t.is_alive(), "no resume point before the stage ended"
    pids = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
    assert pids, "no Ray Train worker process found"
    os.kill(int(pids[-1]), signal.SIGKILL)
    t.join(timeout=600)
    assert not t.is_alive() and "reports" in result
    report = result["reports"][0]
    assert report["resumed"] is not None and report["resumed"]["epoch"] >= 1
    assert report["resumed"]["checksum_restored"] == report["resumed"]["checksum_saved"]
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3, 4]
    ck = checkpoint.load(out / "prune" / "checkpoint.pt")
    sd = ck["model_state_dict"]
    plans = resolve(load_spec(MIXTURE), {k: tuple(v.shape) for k, v in sd.items()})
    assert verify(plans, sd, checkpoint.buffers(ck)["pattern_library"]) == []
