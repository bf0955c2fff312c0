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

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import yaml

from elastictrain.config import ConfigError, apply_overrides, build, fail, is_file, load_yaml, refuse_secrets
from elastictrain.constraints.spec import Spec
from elastictrain.constraints.spec import load as load_spec
from elastictrain.constraints.spec import parse as parse_spec
from elastictrain.data import DataConfig
from elastictrain.files import atomic_write
from elastictrain.train import DistillConfig, EnforceConfig, LRConfig, OptimConfig
from elastictrain.train.attacks import AdversarialConfig
from jobs.cluster import ClusterConfig, DeepSpeedConfig, RayConfig, SlurmConfig, load_cluster  # re-exported

from .tracking import TrackingConfig

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
    distill: Optional[DistillConfig] = None
    """learn from an earlier stage's model too: ``{teacher: dense_pretrain, alpha: 0.5, temperature: 4}``."""
    dropout: Optional[float] = None
    """every dropout layer's probability in this stage (None: the model's own). A network pruned to a
    few percent of its weights has little left to regularize: 0 trains it better."""

    def __post_init__(self) -> None:
        if self.kind is None:
            if self.name not in KINDS:
                fail("kind", f"required when the stage name {self.name!r} is not one of {', '.join(KINDS)}")
            self.kind = self.name  # type: ignore[assignment]
        if self.epochs < 1:
            fail("epochs", f"must be >= 1 (got {self.epochs})")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            fail("dropout", f"must be in [0, 1) (got {self.dropout})")
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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """W&B (``wandb: {mode, project, entity, tags, log_every}``) and progress output."""

    def __post_init__(self) -> None:
        if not self.stages:
            fail("stages", "must hold at least one stage")
        seen: set[str] = set()
        for i, s in enumerate(self.stages):
            if s.name in seen:
                fail(f"stages[{i}].name", f"duplicate stage name {s.name!r}")
            if s.distill is not None and s.distill.teacher not in seen:
                later = " (a later stage: a teacher must have finished first)" if any(
                    x.name == s.distill.teacher for x in self.stages) else ""
                fail(f"stages[{i}].distill.teacher", f"{s.distill.teacher!r} is not an earlier stage{later}; "
                     f"earlier: {', '.join(sorted(seen)) or 'none'}")
            seen.add(s.name)


@dataclass
class PipelineFile:
    """A pipeline file read once: the typed config and the YAML tree it was built from (overrides
    applied), which a snapshot writes back without reading the file again."""

    path: Path
    overrides: list[str]
    raw: dict
    cfg: "PipelineConfig"


def read_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> PipelineFile:
    """Parse and validate a pipeline file (after ``KEY=VALUE`` overrides, see
    ``elastictrain.config.apply_overrides``), loading every stage's spec (relative paths resolve
    against the pipeline file's folder); the previous stage's spec carries into a finetune stage."""
    path = Path(path)
    raw = load_yaml(path)  # its errors name the file already
    if overrides:
        raw = apply_overrides(raw, overrides)
    try:
        cfg = build(PipelineConfig, refuse_secrets(raw))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    previous: Optional[Spec] = None
    for i, stage in enumerate(cfg.stages):
        if isinstance(stage.spec, str):
            spec_path = Path(stage.spec) if Path(stage.spec).is_absolute() else path.parent / stage.spec
            if not is_file(spec_path):
                raise ConfigError(f"{path}: stages[{i}].spec: no such file {spec_path}")
            stage.spec = load_spec(spec_path)
        if stage.spec is None and stage.kind == "finetune":
            stage.spec = previous
        previous = stage.spec if stage.spec is not None else previous
    return PipelineFile(path, list(overrides), raw, cfg)


def load_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """``read_pipeline``'s typed config alone."""
    return read_pipeline(path, overrides).cfg


def snapshot_pipeline(source: PipelineFile, dest: str | Path, more: Sequence[str] = ()) -> Path:
    """Write the pipeline as it will run — overrides (and ``more``, settings the driver resolved)
    applied, spec paths made absolute — to ``dest`` (atomically). Jobs and Ray workers load this
    file, so they run exactly what was validated here even if the original is edited later."""
    raw = apply_overrides(source.raw, more) if more else copy.deepcopy(source.raw)
    path = source.path.resolve()
    for stage in raw.get("stages") or []:
        spec = stage.get("spec") if isinstance(stage, dict) else None
        if isinstance(spec, str) and not Path(spec).is_absolute():
            stage["spec"] = str((path.parent / spec).resolve())
    settings = [*source.overrides, *more]
    header = f"# {path}" + (f" with --set {' '.join(settings)}" if settings else "") + "\n"
    data = (header + yaml.safe_dump(raw, sort_keys=False)).encode()
    atomic_write(dest, lambda f: f.write(data))
    return Path(dest)


__all__ = ["ClusterConfig", "DeepSpeedConfig", "ModelConfig", "PipelineConfig", "PipelineFile", "RayConfig",
           "SlurmConfig", "StageConfig", "load_cluster", "load_pipeline", "parse_spec", "read_pipeline",
           "snapshot_pipeline"]
