"""One pipeline stage as a Ray Train job: ``TorchTrainer`` workers, each a DeepSpeed rank.

Driver side (``run_stage_on_ray``): starts an in-process Ray for ``address: local`` clusters (or
connects to a running head), launches ``num_workers`` workers and waits. Worker side
(``worker_loop``): Ray has created the process group; the worker becomes a ``DeepSpeedBackend``
and runs the stage function the launcher passed in — the same stage code as a single process, with
a DeepSpeed engine, its shard of every batch, metrics reduced over ranks and a rank check after
every constraint update. Rank 0 writes the stage's checkpoint and report (shared storage) and
hands the checkpoint to Ray Train through ``ray.train.report``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from elastictrain.config import build, to_plain
from elastictrain.train import Backend, StageFailed
from jobs.backend import DeepSpeedBackend
from jobs.cluster import ClusterConfig

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


StageFn = Callable[[Backend, dict], tuple[dict, Optional[Path]]]
"""What a worker runs: ``stage_fn(backend, args)`` → (metrics to report, the checkpoint file rank 0
wrote, or None). The launcher passes it in — ``jobs`` never imports ``pipeline`` — and Ray ships it
to the workers by reference (a module-level function of an importable module)."""


def run_stage_on_ray(stage_fn: StageFn, args: dict, cluster: ClusterConfig, name: str) -> None:
    """Run ``stage_fn`` on ``ray.num_workers`` Ray Train workers, each a DeepSpeed rank, and wait.
    A ``StageFailed`` raised on the workers (they raise it together) is raised here, once."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start_ray(cluster)
    r = cluster.ray
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"stage_fn": stage_fn, "args": args, "cluster": to_plain(cluster)},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(Path(r.storage_path).resolve()),
                             failure_config=FailureConfig(max_failures=r.max_failures)),
    )
    result = trainer.fit()
    failed = (result.metrics or {}).get("stage_failed")
    if failed:  # a fault no restart would cure (NaN): the workers stopped together and said why
        raise StageFailed(failed)


def worker_loop(config: dict) -> None:
    """One Ray Train worker: Ray has made the process group; this rank becomes a DeepSpeed backend
    and runs the stage function. Rank 0 hands the stage's checkpoint to Ray Train."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cluster = build(ClusterConfig, config["cluster"])
    torch.set_num_threads(cluster.threads or 1)
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if cluster.ray.gpus_per_worker else torch.device("cpu")
    backend = DeepSpeedBackend(cluster.deepspeed, rank, world, device)
    try:
        metrics, ckpt = config["stage_fn"](backend, config["args"])
    except StageFailed as e:  # every rank raises it together (all_finite); no restart
        ray.train.report({"stage_failed": str(e)})
        return
    if rank == 0 and ckpt is not None:  # Ray Train keeps its own copy (it carries the constraint state)
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(ckpt, Path(tmp) / Path(ckpt).name)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)
