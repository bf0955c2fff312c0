"""Cluster configs: where a pipeline's stages run, and how they get there.

Per kind — stages run …; submitted by:

- ``single`` — in this process, one device; ``elastictrain run``
- ``ray`` — as Ray Train jobs (``num_workers`` ranks, each a DeepSpeed engine) on an in-process Ray
  (``address: local``) or a running head; ``run`` (driver here), or ``submit`` through the head's
  Jobs API (``ray.job_server``)
- ``slurm`` — one sbatch job per stage, chained with ``afterok``; inside a job the stage runs on one
  process or on Ray Train workers across the allocation; ``elastictrain submit``

Run directories (checkpoints, reports, job records) live under ``storage``, which on a multi-node
cluster must be shared storage that every node and the submitting host see at the same path.
"""
from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from elastictrain.config import ConfigError, build, fail, load_yaml, refuse_secrets

EMBEDDED_RAY_ENV = {
    # set in a process that starts the embedded Ray (``address: local``), before Ray reads them.
    # Never passed on to a job that process submits (``jobs.slurm.sbatch``): there they would stop
    # a multi-node Ray and point its ranks at 127.0.0.1.
    # Ray otherwise binds to (and tells workers) the machine's interface address:
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "MASTER_ADDR": "127.0.0.1",
    # Ray starts its workers at nice 15, below its own daemons, which then take the cores first
    # wherever the workers fill them; the training workers are the work (bench/scaling.py has a
    # row at 15: never faster, sometimes clearly slower, on this 2-core machine)
    "RAY_worker_niceness": "0",
}
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


@dataclass(slots=True)
class RayConfig:
    address: str = "local"
    """``local``: start Ray in-process on this machine; else a running head (``127.0.0.1:6379``, ``auto``)."""
    num_workers: int = 2
    """data-parallel workers (ranks), one DeepSpeed engine each."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    storage_path: str = "runs/ray"
    """where Ray Train keeps its checkpoints (shared storage on a multi-node cluster)."""
    dashboard_host: str = "127.0.0.1"
    """interface the dashboard of a local Ray binds to (loopback unless you need it reachable)."""
    job_server: Optional[str] = None
    """a running head's Jobs API (``http://127.0.0.1:8265``): ``elastictrain submit`` sends the run there."""
    working_dir: Optional[str] = None
    """submit: the folder shipped to the cluster as the job's working directory (default: this repository)."""
    python: str = "python"
    """submit: the interpreter the driver job runs on the cluster."""
    connect_timeout_s: float = 30.0
    """how long a running head (``address``) or its Jobs API (``job_server``) may take to answer
    before the command stops with one line naming it."""
    min_workers: Optional[int] = None
    """elastic: a stage that loses workers (a node gone) continues on as few as this many — every
    optimizer step keeps its examples, the smaller group accumulating more micro-batches — and
    grows back to ``num_workers`` when capacity returns (checked every ``resize_every_s``).
    None: the group is fixed at ``num_workers``."""
    resize_every_s: float = 60.0
    """elastic: how often a running group looks for room to grow (a resize restarts the workers,
    which resume from the stage's last completed epoch)."""
    placement: str = "PACK"
    """how the workers' placement group spreads over nodes: ``PACK`` (fill a node first),
    ``SPREAD`` (spread where possible), ``STRICT_SPREAD`` (one worker per node), ``STRICT_PACK``."""
    max_failures: int = 3
    """a lost worker (killed, node gone) restarts the worker group, which resumes the stage from
    its last completed epoch; this many times per stage (0: fail at once)."""

    def __post_init__(self) -> None:
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            fail("min_workers", f"must be in 1..num_workers ({self.num_workers}) (got {self.min_workers})")
        if self.resize_every_s <= 0:
            fail("resize_every_s", f"must be > 0 (got {self.resize_every_s})")
        if self.placement not in PLACEMENTS:
            fail("placement", f"must be one of {', '.join(PLACEMENTS)} (got {self.placement!r})")
        if self.max_failures < 0:
            fail("max_failures", f"must be >= 0 (got {self.max_failures})")
        if not self.connect_timeout_s > 0:
            fail("connect_timeout_s", f"must be > 0 (got {self.connect_timeout_s})")
        if self.num_workers < 1:
            fail("num_workers", f"must be >= 1 (got {self.num_workers})")
        if self.cpus_per_worker <= 0:
            fail("cpus_per_worker", f"must be > 0 (got {self.cpus_per_worker})")
        if self.gpus_per_worker < 0:
            fail("gpus_per_worker", f"must be >= 0 (got {self.gpus_per_worker})")


@dataclass(slots=True)
class DeepSpeedConfig:
    """What each worker's DeepSpeed engine is told; the DeepSpeed JSON is generated from this."""

    zero_stage: int = 2
    """ZeRO stage 0–3 (0: plain data parallel; 1: optimizer states; 2: + gradients; 3: + parameters)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs, fp32 on CPUs. bf16 is autocast compute over fp32 weights (see
    ``jobs.deepspeed_engine``); fp16 is refused: fp16 weights cannot hold fp32 codebook values."""
    gradient_clipping: Optional[float] = None
    sparse_reduce: bool = False
    """ZeRO 0 only: all-reduce only the kept weights' gradients (identical masks on every rank)."""
    shared_memory: Literal["auto", True, False] = "auto"
    """ZeRO 0 on CPUs: ranks that share a host all-reduce gradients through shared memory
    (``elastictrain.distributed.shm``) instead of gloo's sockets. auto: whenever every rank is on
    one host; true: the same, and an error where they are not."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            fail("zero_stage", f"must be 0, 1, 2 or 3 (got {self.zero_stage})")
        if self.gradient_clipping is not None and self.gradient_clipping <= 0:
            fail("gradient_clipping", f"must be > 0 (got {self.gradient_clipping})")
        if self.precision == "fp16":
            fail("precision", "fp16 is not supported: fp16 weights round every codebook value and need loss "
                 "scaling; use bf16 (autocast over fp32 weights, exact codebooks)")
        if self.sparse_reduce and self.zero_stage != 0:
            fail("sparse_reduce", "needs zero_stage 0 (ZeRO 1–3 reduce inside DeepSpeed's partitioned buffers)")
        if self.shared_memory not in (True, False, "auto"):
            fail("shared_memory", f"must be true, false or auto (got {self.shared_memory!r})")
        if self.shared_memory is True and self.zero_stage != 0:
            fail("shared_memory", "needs zero_stage 0 (ZeRO 1–3 reduce inside DeepSpeed's partitioned buffers)")


@dataclass(slots=True)
class SlurmConfig:
    """A Slurm allocation per stage. Inside it the stage runs on one process (one node, one rank)
    or on Ray Train workers: one Ray node per Slurm node, head on the first (the standard
    Ray-on-Slurm pattern), ``workers_per_node`` ranks on each."""

    partition: Optional[str] = None
    account: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int = 1
    mem: Optional[str] = None
    """memory per node as sbatch takes it (``64G``); default: the partition's."""
    time: str = "01:00:00"
    """wall-clock limit per stage job ([D-]HH:MM:SS)."""
    workers_per_node: Optional[int] = None
    """data-parallel ranks per node (default: ``gpus_per_node``, or 1 on CPU nodes)."""
    setup: list[str] = field(default_factory=list)
    """shell lines run first in every job: ``module load …``, a container, ``source .venv/bin/activate``."""
    sbatch: list[str] = field(default_factory=list)
    """extra sbatch options, one per line (``--qos=high``, ``--constraint=a100``)."""
    python: str = "python"
    """the interpreter inside a job (after ``setup``)."""
    ray_port: int = 6379

    def __post_init__(self) -> None:
        for name in ("nodes", "cpus_per_node"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1 (got {getattr(self, name)})")
        if self.gpus_per_node < 0:
            fail("gpus_per_node", f"must be >= 0 (got {self.gpus_per_node})")
        if self.workers_per_node is not None and self.workers_per_node < 1:
            fail("workers_per_node", f"must be >= 1 (got {self.workers_per_node})")
        if self.gpus_per_node and self.workers_per_node and self.gpus_per_node % self.workers_per_node:
            fail("workers_per_node", f"{self.workers_per_node} ranks cannot share {self.gpus_per_node} GPUs evenly")
        if not _TIME.match(self.time):
            fail("time", f"must be [D-]HH[:MM[:SS]] (got {self.time!r})")
        if any(int(x) > 59 for x in self.time.split("-")[-1].split(":")[1:]):
            fail("time", f"minutes and seconds must be 00..59 (got {self.time!r})")
        if not any(int(x) for x in re.split("[-:]", self.time)):
            fail("time", f"must be longer than 0 (got {self.time!r})")
        for i, line in enumerate(self.sbatch):
            if not line.startswith("--") or "\n" in line:
                fail(f"sbatch[{i}]", f"must be one sbatch option starting with -- (got {line!r})")
        for i, line in enumerate(self.setup):
            if "\n" in line:
                fail(f"setup[{i}]", "one shell line per entry")
        if not 1 <= self.ray_port <= 65535:
            fail("ray_port", f"must be a TCP port (got {self.ray_port})")

    @property
    def ranks_per_node(self) -> int:
        return self.workers_per_node or self.gpus_per_node or 1


@dataclass(slots=True)
class ClusterConfig:
    """Where stages run. ``single``: this machine, one process, no Ray (also a single-GPU box);
    ``ray``: Ray Train workers, each a DeepSpeed engine."""

    name: str = "single"
    kind: Literal["single", "ray", "slurm"] = "single"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = None
    """torch intra-op threads per process on the CPU (default: torch's choice)."""
    ray: Optional[RayConfig] = None
    deepspeed: Optional[DeepSpeedConfig] = None
    slurm: Optional[SlurmConfig] = None
    storage: str = "runs"
    """root of the run directories (shared storage on a multi-node cluster); a run goes to STORAGE/<pipeline>."""
    gradient_accumulation: int = 1
    """micro-batches of ``data.batch_size`` per optimizer step (a step then averages A × batch_size
    examples); every kind (DeepSpeed is told it). The constrainer's schedule, the LR schedule and
    step metrics count optimizer steps; an epoch's last ``steps % A`` micro-batches are left out."""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            fail("threads", f"must be >= 1 (got {self.threads})")
        if self.gradient_accumulation < 1:
            fail("gradient_accumulation", f"must be >= 1 (got {self.gradient_accumulation})")
        if self.kind == "slurm":
            if self.slurm is None:
                fail("slurm", "kind: slurm needs a slurm section (partition, nodes, gpus_per_node, …)")
            if self.ray is not None:
                fail("ray", "a slurm cluster starts its own Ray inside each allocation; remove the ray section")
            self.deepspeed = self.deepspeed or DeepSpeedConfig()
        elif self.slurm is not None:
            fail("slurm", f"only kind: slurm takes a slurm section (this cluster is kind: {self.kind})")
        if self.kind == "ray":
            self.ray = self.ray or RayConfig()
            self.deepspeed = self.deepspeed or DeepSpeedConfig()
        elif self.kind == "single" and (self.ray is not None or self.deepspeed is not None):
            fail("kind", "a single-process cluster takes no ray or deepspeed section (kind: ray does)")
        if self.kind == "ray" and self.device == "cuda" and self.ray.gpus_per_worker == 0:
            fail("ray.gpus_per_worker", "device: cuda needs GPUs per worker")
        if self.deepspeed is not None and self.deepspeed.shared_memory is True and self.device == "cuda":
            fail("deepspeed.shared_memory", "reduces CPU gradients; on GPUs NCCL does this")


DEFAULT_CLUSTER = Path(__file__).resolve().parents[1] / "configs" / "clusters" / "local.yaml"


def load_cluster(path: str | Path | None) -> ClusterConfig:
    """A cluster config; ``None`` means the embedded default, ``configs/clusters/local.yaml``."""
    if path is None:
        path = DEFAULT_CLUSTER
    raw = load_yaml(path)  # its errors name the file already
    try:
        return build(ClusterConfig, refuse_secrets(raw))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def check_answers(address: str, key: str, timeout_s: float) -> None:
    """One line naming ``address`` unless something accepts a TCP connection there within
    ``timeout_s`` (Ray's own client retries a missing head for minutes, printing warnings)."""
    if address == "auto":
        return  # Ray reads the address of the head started on this machine, and says when there is none
    scheme, _, rest = address.rpartition("://")
    rest = rest.split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():  # each scheme's default port (a bare host:port is a GCS address)
        host, port = rest, {"http": "80", "https": "443", "ray": "10001"}.get(scheme, "6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise ConfigError(f"{key}: nothing answers at {address} within ray.connect_timeout_s ({timeout_s:g} s): "
                          f"{why}; is the head running?") from None
