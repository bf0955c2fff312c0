"""One pipeline stage as a Ray Train job: ``TorchTrainer`` workers, each a DeepSpeed engine.

Driver side (``run_stage_on_ray``): starts an in-process Ray for ``address: local`` clusters (or
connects to a running head), launches ``num_workers`` workers and waits. Worker side
(``worker_loop``): Ray has created the process group; the worker loads the configs and the data,
runs the same ``pipeline.stage.run_stage`` as a single process — with a DeepSpeed engine, its
shard of every batch, metrics summed over ranks — and checks after every constraint update that
all ranks hold bit-identical masks, codebooks and libraries. Rank 0 writes the stage's checkpoint
and report (shared storage) and hands the checkpoint to Ray Train through ``ray.train.report``.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from elastictrain.config import build, to_plain
from pipeline.config import ClusterConfig

LOOPBACK_ENV = {
    # Ray otherwise binds to (and tells workers) the machine's interface address
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "MASTER_ADDR": "127.0.0.1",
}


def worker_env(cluster: ClusterConfig) -> dict:
    env = {"OMP_NUM_THREADS": str(cluster.threads or 1)}
    if cluster.device != "cuda" and cluster.ray.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator: gloo, no CUDA probing
    return env


def start_ray(cluster: ClusterConfig) -> None:
    local = cluster.ray.address == "local"
    if local:  # before Ray is imported: it reads these when it picks the node's address
        for k, v in {**LOOPBACK_ENV, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}.items():
            os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return
    env = worker_env(cluster)
    if local:
        need = cluster.ray.num_workers * cluster.ray.cpus_per_worker + 1  # + the trainer's controller
        ray.init(num_cpus=int(need + 0.999), num_gpus=int(cluster.ray.num_workers * cluster.ray.gpus_per_worker),
                 # the dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls
                 # (without it: a warning every few seconds); loopback only, like everything we start
                 include_dashboard=True, dashboard_host=cluster.ray.dashboard_host, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": env},
                 log_to_driver=True, configure_logging=False)
    else:
        ray.init(address=cluster.ray.address, runtime_env={"env_vars": env})


def run_stage_on_ray(pipeline_path: Path, cluster: ClusterConfig, run_dir: Path, index: int, stage_name: str,
                     pipeline_name: str) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start_ray(cluster)
    r = cluster.ray
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"pipeline": str(Path(pipeline_path).resolve()), "cluster": to_plain(cluster),
                           "run_dir": str(Path(run_dir).resolve()), "index": index},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"{pipeline_name}-{stage_name}", storage_path=str(Path(r.storage_path).resolve()),
                             failure_config=FailureConfig(max_failures=r.max_failures)),
    )
    result = trainer.fit()
    failed = (result.metrics or {}).get("stage_failed")
    if failed:  # a fault no restart would cure (NaN): the workers stopped together and said why
        from pipeline.stage import StageFailed

        raise StageFailed(failed)


def worker_loop(config: dict) -> None:
    import ray.train

    from elastictrain import checkpoint
    from elastictrain.data import load as load_data
    from pipeline.config import load_pipeline
    from pipeline.stage import Context, StageFailed, run_stage, stage_dir

    from .deepspeed_engine import autocast_dtype, engine_factory, gathered_state_dict

    ctx_r = ray.train.get_context()
    rank, world = ctx_r.get_world_rank(), ctx_r.get_world_size()
    cluster = build(ClusterConfig, config["cluster"])
    torch.set_num_threads(cluster.threads or 1)
    cfg = load_pipeline(config["pipeline"])
    index = config["index"]
    run_dir = Path(config["run_dir"])
    device = torch.device(f"cuda:{ctx_r.get_local_rank()}") if cluster.ray.gpus_per_worker else torch.device("cpu")
    previous = None
    if index > 0:
        previous = checkpoint.load(run_dir / cfg.stages[index - 1].name / "checkpoint.pt")
    ctx = Context(cfg, load_data(cfg.data), device, autocast_dtype(cluster.deepspeed, device), run_dir, world_size=world, rank=rank,
                  log=print if rank == 0 else (lambda s: None),
                  make_engine=with_rank_checks(engine_factory(cluster.deepspeed, cfg.data.batch_size // world, world, device)),
                  reduce_metrics=reduce_metrics, optimizer_state=lambda opt: None, cluster=config["cluster"])
    if cluster.deepspeed.zero_stage == 3:
        ctx.state_dict = gathered_state_dict
    ctx.all_finite, ctx.barrier = all_finite, torch.distributed.barrier
    try:
        report = run_stage(ctx, index, previous)
    except StageFailed as e:  # every rank raises it together (all_finite); no restart
        ray.train.report({"stage_failed": str(e)})
        return
    metrics = {k: report[k] for k in ("top1", "top5", "pruning_ratio", "nominal_compression", "seconds")}
    if rank == 0:  # Ray Train keeps its own copy of the checkpoint (it carries the constraint state)
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(stage_dir(ctx, cfg.stages[index]) / "checkpoint.pt", Path(tmp) / "checkpoint.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def all_finite(x: float) -> bool:
    """``x`` is finite on every rank (one float all-reduced): ranks stop together or not at all."""
    import torch.distributed as dist

    t = torch.tensor([0.0 if math.isfinite(x) else 1.0])
    dist.all_reduce(t)
    return float(t[0]) == 0.0


def with_rank_checks(make):
    """Wrap an engine factory so every constraint update is checked across ranks."""

    def wrapped(model, opt, sched, stage, constrainer):
        out = make(model, opt, sched, stage, constrainer)
        if constrainer is not None:
            constrainer.listeners.append(check_ranks)
        return out

    return wrapped


def check_ranks(constrainer, event: str) -> None:
    """Masks, libraries and codebooks must be bit-identical on every rank (an all-gathered
    fingerprint, a few bytes per layer); a mismatch stops the run naming the layer and ranks."""
    from elastictrain.dist import check_identical

    check_identical(constrainer.masks, "masks")
    check_identical(constrainer.libraries, "pattern libraries")
    check_identical(constrainer.codebooks, "codebooks")


def reduce_metrics(m: dict) -> dict:
    """Per-rank metrics → global: test metrics weighted by each rank's test images, training
    loss/accuracy averaged (equal shards), throughput summed."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return m
    m = dict(m)
    if "test_images" in m:
        n = m["test_images"]
        t = torch.tensor([m["top1"] * n, m["top5"] * n, m["test_loss"] * n, n], dtype=torch.float64)
        dist.all_reduce(t)
        m.update(top1=float(t[0] / t[3]), top5=float(t[1] / t[3]), test_loss=float(t[2] / t[3]), test_images=int(t[3]))
    if "robust_images" in m:  # robust accuracies, weighted by each rank's attacked images
        keys = sorted(k for k in m if k.startswith("robust:"))
        n = m["robust_images"]
        t = torch.tensor([m[k] * n for k in keys] + [n], dtype=torch.float64)
        dist.all_reduce(t)
        m.update({k: float(t[i] / max(float(t[-1]), 1)) for i, k in enumerate(keys)}, robust_images=int(t[-1]))
    if "loss" in m:
        w = dist.get_world_size()
        t = torch.tensor([m["loss"], m["train_acc"], m["images_per_s"]], dtype=torch.float64)
        dist.all_reduce(t)
        m.update(loss=float(t[0] / w), train_acc=float(t[1] / w), images_per_s=float(t[2]))
    return m
