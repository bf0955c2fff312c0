"""Pipeline and cluster configs: typed, validated on load, errors naming the field.

A pipeline names the model, the data and an ordered list of stages. Each stage has its epochs,
optimizer, LR schedule, the compression spec it must end on (a path relative to the pipeline
file, or inline) and how the spec is enforced. The four standard stage kinds come with defaults:

| kind | spec | enforce |
|---|---|---|
| dense_pretrain | none | — |
| progressive_prune | required | progressive (cubic schedule) |
| quantize | required | fixed masks, QAT with codebooks refit |
| finetune | inherited from the previous stage when absent | fixed masks, QAT with codebooks refit |
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from elastictrain.config import ConfigError, build, fail, load_yaml
from elastictrain.data import DataConfig
from elastictrain.robust import AdversarialConfig
from elastictrain.spec import Spec, load as load_spec, parse as parse_spec
from elastictrain.train import EnforceConfig, LRConfig, OptimConfig

KINDS = ("dense_pretrain", "progressive_prune", "quantize", "finetune")


@dataclass(slots=True)
class ModelConfig:
    name: str
    """a zoo name (vgg16, resnet20, convnet, …) or torchvision:NAME; classes/channels come from the data."""


@dataclass(slots=True)
class StageConfig:
    name: str
    """unique within the pipeline; the stage's outputs go to RUN_DIR/<name>/."""
    kind: Optional[Literal["dense_pretrain", "progressive_prune", "quantize", "finetune"]] = None
    """defaults to ``name`` when that is a standard kind."""
    epochs: int = 1
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    lr_schedule: LRConfig = field(default_factory=LRConfig)
    spec: Union[str, Spec, None] = None
    """compression spec: a YAML path (relative to the pipeline file) or an inline spec."""
    enforce: Optional[EnforceConfig] = None
    adversarial: Optional[AdversarialConfig] = None
    """robust training: e.g. ``{beta: 0.5, attack: {kind: pgd, eps: 0.0314, steps: 7}}``."""

    def __post_init__(self) -> None:
        if self.kind is None:
            if self.name not in KINDS:
                fail("kind", f"required when the stage name {self.name!r} is not one of {', '.join(KINDS)}")
            self.kind = self.name  # type: ignore[assignment]
        if self.epochs < 1:
            fail("epochs", f"must be >= 1 (got {self.epochs})")
        if self.kind == "dense_pretrain" and self.spec is not None:
            fail("spec", "a dense_pretrain stage trains without constraints; remove the spec")
        if self.kind in ("progressive_prune", "quantize") and self.spec is None:
            fail("spec", f"a {self.kind} stage needs a compression spec")
        if self.enforce is None and self.kind != "dense_pretrain":
            self.enforce = EnforceConfig(method="progressive" if self.kind == "progressive_prune" else "fixed")


@dataclass(slots=True)
class PipelineConfig:
    name: str
    model: ModelConfig
    data: DataConfig
    stages: list[StageConfig]
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on a GPU, fp32 on the CPU."""

    def __post_init__(self) -> None:
        if not self.stages:
            fail("stages", "must hold at least one stage")
        seen: set[str] = set()
        for i, s in enumerate(self.stages):
            if s.name in seen:
                fail(f"stages[{i}].name", f"duplicate stage name {s.name!r}")
            seen.add(s.name)


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

    def __post_init__(self) -> None:
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
    gradient_accumulation: int = 1
    gradient_clipping: Optional[float] = None
    sparse_reduce: bool = False
    """ZeRO 0 only: all-reduce only the kept weights' gradients (identical masks on every rank)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            fail("zero_stage", f"must be 0, 1, 2 or 3 (got {self.zero_stage})")
        if self.gradient_accumulation < 1:
            fail("gradient_accumulation", f"must be >= 1 (got {self.gradient_accumulation})")
        if self.gradient_clipping is not None and self.gradient_clipping <= 0:
            fail("gradient_clipping", f"must be > 0 (got {self.gradient_clipping})")
        if self.precision == "fp16":
            fail("precision", "fp16 is not supported: fp16 weights round every codebook value and need loss "
                 "scaling; use bf16 (autocast over fp32 weights, exact codebooks)")
        if self.sparse_reduce and self.zero_stage != 0:
            fail("sparse_reduce", "needs zero_stage 0 (ZeRO 1–3 reduce inside DeepSpeed's partitioned buffers)")


@dataclass(slots=True)
class ClusterConfig:
    """Where stages run. ``single``: this machine, one process, no Ray (also a single-GPU box);
    ``ray``: Ray Train workers, each a DeepSpeed engine."""

    name: str = "single"
    kind: Literal["single", "ray"] = "single"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = None
    """torch intra-op threads per process on the CPU (default: torch's choice)."""
    ray: Optional[RayConfig] = None
    deepspeed: Optional[DeepSpeedConfig] = None

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            fail("threads", f"must be >= 1 (got {self.threads})")
        if self.kind == "ray":
            self.ray = self.ray or RayConfig()
            self.deepspeed = self.deepspeed or DeepSpeedConfig()
        elif self.ray is not None or self.deepspeed is not None:
            fail("kind", "a single-process cluster takes no ray or deepspeed section (kind: ray does)")
        if self.kind == "ray" and self.device == "cuda" and self.ray.gpus_per_worker == 0:
            fail("ray.gpus_per_worker", "device: cuda needs GPUs per worker")


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Parse and validate a pipeline file, loading every stage's spec (relative paths resolve
    against the pipeline file's folder); the previous stage's spec carries into a finetune stage."""
    path = Path(path)
    try:
        cfg = build(PipelineConfig, load_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    previous: Optional[Spec] = None
    for i, stage in enumerate(cfg.stages):
        if isinstance(stage.spec, str):
            spec_path = Path(stage.spec) if Path(stage.spec).is_absolute() else path.parent / stage.spec
            if not spec_path.is_file():
                raise ConfigError(f"{path}: stages[{i}].spec: no such file {spec_path}")
            stage.spec = load_spec(spec_path)
        elif isinstance(stage.spec, Spec):
            pass
        if stage.spec is None and stage.kind == "finetune":
            stage.spec = previous
        previous = stage.spec if stage.spec is not None else previous
    return cfg


DEFAULT_CLUSTER = Path(__file__).resolve().parents[1] / "configs" / "clusters" / "local.yaml"


def load_cluster(path: str | Path | None) -> ClusterConfig:
    """A cluster config; ``None`` means the embedded default, ``configs/clusters/local.yaml``."""
    if path is None:
        path = DEFAULT_CLUSTER
    try:
        return build(ClusterConfig, load_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


__all__ = ["ClusterConfig", "DeepSpeedConfig", "RayConfig", "ModelConfig", "PipelineConfig", "StageConfig", "load_cluster", "load_pipeline", "parse_spec"]
