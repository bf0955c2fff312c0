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
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from elastictrain.config import ConfigError, build, to_plain
from elastictrain.console import redirected
from elastictrain.distributed import RanksDiverged
from elastictrain.train import Backend, StageFailed
from jobs.backend import DeepSpeedBackend
from jobs.cluster import EMBEDDED_RAY_ENV, ClusterConfig, check_answers
from jobs.output import Follower, console_writer, stamp


def worker_env(cluster: ClusterConfig) -> dict:
    env = {"OMP_NUM_THREADS": str(cluster.threads or 1),
           # Ray Train's print() also goes to its logger, so each line reached the log twice
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if cluster.device != "cuda" and cluster.ray.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator: gloo, no CUDA probing
    return env


def start_ray(cluster: ClusterConfig, verbose: bool = False) -> None:
    """Start an in-process Ray (``address: local``) or connect to the running head, once per
    process. Workers' output stays in their logs unless ``verbose`` (Ray then forwards it, prefixed)."""
    local = cluster.ray.address == "local"
    if local:  # before Ray is imported: it reads these when it picks the node's address
        for k, v in {**EMBEDDED_RAY_ENV, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}.items():
            os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return
    env = worker_env(cluster)
    if local:
        need = cluster.ray.num_workers * cluster.ray.cpus_per_worker + 1  # + the trainer's controller
        # address="local": a new Ray, never one that ``ray start`` left running on this machine
        ray.init(address="local", num_cpus=int(need + 0.999),
                 num_gpus=int(cluster.ray.num_workers * cluster.ray.gpus_per_worker),
                 # the dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls
                 # (without it: a warning every few seconds); loopback only, like everything we start
                 include_dashboard=True, dashboard_host=cluster.ray.dashboard_host, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": env}, log_to_driver=verbose, configure_logging=False)
    else:
        check_answers(cluster.ray.address, "ray.address", cluster.ray.connect_timeout_s)
        ray.init(address=cluster.ray.address, runtime_env={"env_vars": env}, log_to_driver=verbose)


StageFn = Callable[[Backend, dict, Callable[[str], None]], tuple[dict, Optional[Path]]]
"""What a worker runs: ``stage_fn(backend, args, log)`` → (metrics to report, the checkpoint file
rank 0 wrote, or None); ``log`` prints a line on the driver's console (rank 0; a no-op elsewhere).
The launcher passes it in — ``jobs`` never imports ``pipeline`` — and Ray ships it to the workers by
reference (a module-level function of an importable module)."""


def run_stage_on_ray(stage_fn: StageFn, args: dict, cluster: ClusterConfig, name: str, logs: Path,
                     log: Callable[[str], None] = print, verbose: bool = False) -> None:
    """Run ``stage_fn`` on ``ray.num_workers`` Ray Train workers, each a DeepSpeed rank, and wait.

    Each rank's output goes to ``logs/rank<R>.log``; rank 0's console lines reach ``log`` here. A
    worker's error is raised here once, as ``raise_user_error`` words it, and never retried: a restart
    from the same resume point meets it again. Only lost workers (a killed process, a gone node, a
    broken connection between ranks) restart the worker group, which resumes from the stage's last
    resume point on disk — at most ``ray.max_failures`` times."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    start_ray(cluster, verbose)
    r = cluster.ray
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    logs.mkdir(parents=True, exist_ok=True)
    storage = str(Path(r.storage_path).resolve())
    for attempt in range(r.max_failures + 1):
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"stage_fn": stage_fn, "args": args, "cluster": to_plain(cluster), "logs": str(logs)},
            scaling_config=ScalingConfig(
                num_workers=r.num_workers if r.min_workers is None else (r.min_workers, r.num_workers),
                elastic_resize_monitor_interval_s=r.resize_every_s, use_gpu=r.gpus_per_worker > 0,
                resources_per_worker=resources, placement_strategy=r.placement),
            # a fresh Ray Train run each attempt: the stage resumes from its own resume points, not
            # from a snapshot Ray keeps under a name another run directory may have used before
            run_config=RunConfig(name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{attempt}", storage_path=storage,
                                 failure_config=FailureConfig(max_failures=0)),
        )
        follower = Follower(logs / "console.log", log)
        try:
            trainer.fit()
            return
        except TrainingFailedError as e:
            failures = getattr(e, "worker_failures", None) or {-1: e}
            raise_user_error(failures, name, logs)
            lost = "; ".join(f"rank {k}: {_first_line(v)}" for k, v in sorted(failures.items()))
            if attempt == r.max_failures:
                raise StageFailed(f"[{name}] workers lost {attempt + 1} times (ray.max_failures: {r.max_failures}); "
                                  f"last: {lost}; the stage resumes from its last epoch when run again") from None
        finally:
            follower.stop()
        log(f"[{name}] a worker was lost ({lost}); restarting the worker group "
            f"({attempt + 1} of ray.max_failures: {r.max_failures})")


def lost_worker(e: BaseException) -> bool:
    """Whether a rank failed because a process, node or connection went away (what a restart can
    cure) rather than by an error of its own."""
    from ray.exceptions import RayError
    from ray.train.v2._internal.exceptions import RayTrainError

    if isinstance(e, (RayError, RayTrainError, ConnectionError)):
        return True  # Ray's own: health check failed, actor died, node died, start-up timed out
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in _COMM_FAILURES)


_COMM_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL error",
                  "ProcessGroupNCCL", "Socket Timeout", "Timed out waiting", "connectFullMesh")


def raise_user_error(failures: dict, name: str, logs: Path) -> None:
    """Raise the ranks' own error, if any rank had one, as the one line a single process prints:
    ``ConfigError`` (exit 2) and ``StageFailed`` (NaN, exit 1) as they are, ranks that diverged
    as ``StageFailed``, anything else as ``StageFailed`` naming the rank log with its traceback.
    Returns when every failure is a lost worker."""
    own = {k: v for k, v in sorted(failures.items()) if not lost_worker(v)}
    if not own:
        return
    for cls in (ConfigError, StageFailed):
        for e in own.values():
            if isinstance(e, cls):
                raise type(e)(str(e)) from None
    rank, e = next(iter(own.items()))
    where = f"; traceback in {logs / f'rank{rank}.log'}" if rank >= 0 else ""
    if isinstance(e, RanksDiverged):
        raise StageFailed(f"[{name}] {e}") from None
    raise StageFailed(f"[{name}] rank {rank}: {type(e).__name__}: {_first_line(e)}{where}") from None


def _first_line(e: BaseException) -> str:
    """The line that says what happened (Ray's errors open with a generic "Training failed due to …:")."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip() and not x.startswith("Training failed due to")]
    return lines[0] if lines else type(e).__name__


def worker_loop(config: dict) -> None:
    """One Ray Train worker: Ray has made the process group; this rank becomes a DeepSpeed backend
    and runs the stage function, its output in ``logs/rank<R>.log``. Rank 0 hands the stage's
    checkpoint to Ray Train."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logs = Path(config["logs"])
    with redirected(logs / f"rank{rank}.log"):
        node = ray.util.get_node_ip_address()
        print(f"== {stamp()} rank {rank} of {world} started (pid {os.getpid()}, node {node})", flush=True)
        cluster = build(ClusterConfig, config["cluster"])
        torch.set_num_threads(cluster.threads or 1)
        device = torch.device(f"cuda:{ctx.get_local_rank()}") if cluster.ray.gpus_per_worker else torch.device("cpu")
        log = console_writer(logs / "console.log", sys.stdout) if rank == 0 else (lambda s: None)
        try:
            backend = DeepSpeedBackend(cluster.deepspeed, rank, world, device, cluster.gradient_accumulation,
                                       nominal_world=cluster.ray.num_workers)
            metrics, ckpt = config["stage_fn"](backend, config["args"], log)
        except BaseException:
            traceback.print_exc()  # into the rank's log; the driver prints one line naming it
            raise
        if rank == 0 and ckpt is not None:  # Ray Train keeps its own copy (it carries the constraint state)
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(ckpt, Path(tmp) / Path(ckpt).name)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
