"""Slurm: one sbatch job per pipeline stage, rendered from the cluster config, chained with
``--dependency=afterok`` and ``--kill-on-invalid-dep=yes``, so a stage starts only when the
previous one succeeded and a failure cancels the rest (without that flag, and without the
controller's ``DependencyParameters=kill_invalid_depend``, they would pend forever).

Inside a job the stage runs through ``elastictrain run --stages NAME`` (earlier stages' finished
checkpoints on the shared run directory are read, not redone) against an *inner* cluster config
written next to the scripts: one process for a one-rank allocation, an in-process Ray for one
node, or — several nodes — Ray started across the allocation by ``slurm/ray-cluster.sh``.
"""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from string import Template

from elastictrain.config import ConfigError, to_plain
from jobs.cluster import EMBEDDED_RAY_ENV, ClusterConfig

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "slurm" / "stage.sbatch"
RAY_SCRIPT = ROOT / "slurm" / "ray-cluster.sh"


def inner_cluster(cluster: ClusterConfig, run_dir: Path) -> dict:
    """The cluster config a stage job runs its stage on (plain, for YAML)."""
    s = cluster.slurm
    ranks = s.nodes * s.ranks_per_node
    device = "cuda" if s.gpus_per_node else "cpu"
    base = {"name": f"{cluster.name}-allocation", "device": device}
    if device == "cpu":
        base["threads"] = max(1, s.cpus_per_node // s.ranks_per_node)
    if ranks == 1:
        return {**base, "kind": "single"}
    ray = {"address": "local" if s.nodes == 1 else "auto", "num_workers": ranks,
           "cpus_per_worker": (max(1, (s.cpus_per_node - 1) // s.ranks_per_node) if s.nodes == 1
                               else max(1, s.cpus_per_node // s.ranks_per_node)),
           "gpus_per_worker": s.gpus_per_node / s.ranks_per_node, "storage_path": str(run_dir / "ray")}
    if s.nodes > 1:
        # ``auto``: the head slurm/ray-cluster.sh started in this job (it exports RAY_ADDRESS, which
        # Ray reads first; the head's address differs from job to job, so it cannot be written here).
        # workers_per_node ranks on each node: the default PACK would fill the head first wherever
        # a node has room for more (cpus_per_worker rounds down; Ray Train's controller takes no CPU);
        # one rank per node is exactly STRICT_SPREAD, several are spread evenly by SPREAD.
        ray["placement"] = "STRICT_SPREAD" if s.ranks_per_node == 1 else "SPREAD"
    return {**base, "kind": "ray", "deepspeed": to_plain(cluster.deepspeed), "ray": ray}


def render(cluster: ClusterConfig, pipeline: Path, run_dir: Path, stage: str, pipeline_name: str,
           inner_path: Path, workdir: Path = ROOT) -> str:
    """The sbatch script of one stage."""
    s = cluster.slurm
    q = shlex.quote
    resources = []
    if s.gpus_per_node:
        resources.append(f"#SBATCH --gpus-per-node={s.gpus_per_node}")
    for key, value in (("partition", s.partition), ("account", s.account), ("mem", s.mem)):
        if value:
            resources.append(f"#SBATCH --{key}={value}")
    resources += [f"#SBATCH {line}" for line in s.sbatch]
    ray_block = ""
    if s.nodes > 1:
        ray_block = (f"PY={q(s.python)} RAY_PORT={s.ray_port} CPUS={s.cpus_per_node} GPUS={s.gpus_per_node}\n"
                     f"source {q(str(RAY_SCRIPT))}")
    return Template(TEMPLATE.read_text()).substitute(
        job_name=f"et-{pipeline_name}-{stage}", nodes=s.nodes, cpus_per_node=s.cpus_per_node, time=s.time,
        log=q(str(run_dir / "submit" / f"{stage}-%j.out")), resource_lines="\n".join(resources),
        workdir=q(str(workdir)), setup_lines="\n".join(s.setup), stage=q(stage), pipeline_name=pipeline_name,
        ray_block=ray_block, python=s.python, pipeline=q(str(pipeline)), inner_cluster=q(str(inner_path)),
        run_dir=q(str(run_dir)))


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=job_env())
    except FileNotFoundError:
        raise ConfigError(f"{cmd[0]}: not found — is this a Slurm login node (slurm-client installed)?") from None
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        raise ConfigError(f"{' '.join(cmd[:2])}: {msg[-1] if msg else f'exit {out.returncode}'}")
    return out.stdout.strip()


def job_env() -> dict:
    """The environment a job inherits (sbatch exports the submitter's): without the loopback settings
    of an embedded Ray this process may have started (``EMBEDDED_RAY_ENV``), which would stop the job's
    multi-node Ray ("not supported") and point its ranks at 127.0.0.1."""
    return {k: v for k, v in os.environ.items() if k not in EMBEDDED_RAY_ENV}


def sbatch(script: Path, after: str | None = None, test_only: bool = False) -> str:
    """Submit ``script`` (after job ``after`` succeeded); the job id, or sbatch's verdict with ``test_only``."""
    cmd = (["sbatch", "--parsable"] + ([f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else [])
           + (["--test-only"] if test_only else []))
    if test_only:  # the verdict goes to stderr, exit status 0 or 1
        out = subprocess.run(cmd + [str(script)], capture_output=True, text=True, timeout=60, env=job_env())
        return (out.stderr or out.stdout).strip() + ("" if out.returncode == 0 else f" (exit {out.returncode})")
    return _run(cmd + [str(script)]).split(";")[0]


def job_states(ids: list[str]) -> dict[str, str]:
    """Slurm's state of each job (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, …); jobs Slurm
    no longer knows are left out. ``squeue --states=all`` works without accounting (no sacct)."""
    if not ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "--states=all", "-j", ",".join(ids), "-o", "%i|%T"],
                             capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ConfigError("squeue: not found — the jobs' states come from Slurm's client tools "
                          "(slurm-client) on a login node of the cluster") from None
    except subprocess.TimeoutExpired:
        raise ConfigError("squeue: no answer from the Slurm controller within 60 s") from None
    states = {}
    for line in out.stdout.splitlines():
        jid, _, state = line.partition("|")
        states[jid.strip()] = state.strip()
    return states
