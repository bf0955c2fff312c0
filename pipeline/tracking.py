"""Weights & Biases tracking: one W&B run per stage, grouped by the pipeline run.

- ``group`` = the run directory's tracking group (``RUN_DIR/tracking.json``, made once per run
  directory), ``job_type`` = the stage's name, ``config`` = the resolved pipeline, the stage and
  the cluster. A stage that runs again (after a failure or preemption) continues its W&B run:
  the run id is kept in ``tracking.json`` and W&B is told ``resume="allow"``.
- Only rank 0 logs; other ranks get a ``NullTracker``.
- Modes: ``online``, ``offline`` (nothing leaves the machine; ``wandb sync RUN_DIR/wandb/offline-run-*``
  later), ``disabled`` (W&B is not even imported). ``auto`` takes ``$WANDB_MODE`` and is
  ``disabled`` when that is unset. The API key is read by W&B itself from ``WANDB_API_KEY`` (or
  its netrc): it never appears in a config file, a report or a log line written here.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from elastictrain.config import fail
from elastictrain.files import atomic_write

MODES = ("online", "offline", "disabled")


@dataclass(slots=True)
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: $WANDB_MODE when set, else disabled."""
    project: str = "elastictrain"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    log_every: int = 20
    """training steps between step-level logs (loss, LR, images/s)."""
    dir: Optional[str] = None
    """where W&B writes its runs: this, else $WANDB_DIR (read once by the driver), else RUN_DIR."""

    def __post_init__(self) -> None:
        if self.log_every < 1:
            fail("log_every", f"must be >= 1 (got {self.log_every})")
        if not self.project.strip():
            fail("project", "must not be empty")


@dataclass(slots=True)
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    """auto: a progress bar on a terminal, a log line every ``progress_every_s`` otherwise."""
    progress_every_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.progress_every_s > 0:
            fail("progress_every_s", f"must be > 0 (got {self.progress_every_s})")


def resolve_mode(cfg: WandbConfig) -> str:
    mode = cfg.mode
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE", "").strip().lower() or "disabled"
        if mode == "dryrun":  # W&B's old name for offline
            mode = "offline"
        if mode not in MODES:
            fail("tracking.wandb.mode", f"auto took WANDB_MODE={mode!r} from the environment; "
                                        f"expected one of {', '.join(MODES)}")
    return mode


def _ids(run_dir: Path, pipeline: str, stage: Optional[str] = None) -> dict:
    """``RUN_DIR/tracking.json``: the run's W&B group and each stage's run id, made on first use."""
    path = run_dir / "tracking.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    changed = False
    if "group" not in data:
        data["group"], changed = f"{pipeline}-{uuid.uuid4().hex[:8]}", True
    runs = data.setdefault("runs", {})
    if stage is not None and stage not in runs:
        runs[stage], changed = f"{data['group']}-{stage}"[:120], True
    if changed:
        text = json.dumps(data, indent=2).encode()
        atomic_write(path, lambda f: f.write(text))
    return data


class NullTracker:
    run_id: Optional[str] = None

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        pass

    def finish(self, report: Optional[dict] = None, files: tuple = (), failed: bool = False) -> None:
        pass


class WandbTracker(NullTracker):
    """One stage's W&B run. ``log`` takes plain floats / ints keyed ``section/name``."""

    def __init__(self, cfg: WandbConfig, mode: str, run_dir: Path, pipeline: str, stage: str, config: dict):
        import wandb

        ids = _ids(run_dir, pipeline, stage)
        self.run_id, self.group, self.stage = ids["runs"][stage], ids["group"], stage
        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=self.group, job_type=stage,
                              name=f"{pipeline}/{stage}", id=self.run_id, resume="allow", tags=list(cfg.tags),
                              dir=str(Path(cfg.dir) if cfg.dir else run_dir), mode=mode, config=config,
                              reinit="create_new",
                              settings=wandb.Settings(console="off", x_disable_stats=True))
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        if step is not None:
            metrics = {**metrics, "train/step": step}
        self.run.log(metrics)

    def finish(self, report: Optional[dict] = None, files: tuple = (), failed: bool = False) -> None:
        if report is not None:
            for k, v in report.items():
                if isinstance(v, (int, float, str, bool)) or v is None:
                    self.run.summary[k] = v
            for k, v in (report.get("robust") or {}).items():
                self.run.summary[f"robust/{k}"] = v
            layers = report.get("layers") or []
            if layers:
                cols = [c for c in ("name", "shape", "params", "nonzeros", "density", "pruning_ratio", "bits",
                                    "codebooks", "unique_values", "encoding", "storage_bits") if c in layers[0]]
                rows = [[str(l.get(c)) if c == "shape" else l.get(c) for c in cols] for l in layers]
                self.run.log({"report/layers": self.wandb.Table(columns=cols, data=rows)})
        existing = [Path(f) for f in files if Path(f).is_file()]
        if existing:  # referenced, not copied: checkpoints can be large; the run dir is shared storage
            art = self.wandb.Artifact(f"{self.group}-{self.stage}", type="model",
                                      metadata={k: report[k]
                                                for k in ("top1", "nominal_compression", "honest_compression")
                                                if report and k in report})
            for f in existing:
                art.add_reference(f"file://{f.resolve()}", name=f.name)
            self.run.log_artifact(art)
        self.run.finish(exit_code=1 if failed else 0)


class StepMetrics:
    """Turns the loop's per-step callbacks and the constrainer's update events into tracker logs:
    step metrics every ``log_every`` steps, one record per mask update / codebook refit, and the
    epoch's figures. Cheap on every rank; only rank 0's tracker writes anything."""

    def __init__(self, tracker, log_every: int, steps_per_epoch: int, world_size: int = 1):
        self.tracker, self.every, self.per_epoch, self.world = tracker, log_every, max(steps_per_epoch, 1), world_size
        self.step, self.epoch_base = 0, 0
        self.t_last, self.images = time.perf_counter(), 0
        self.changes_seen = 0
        self.live = type(tracker) is not NullTracker

    def on_step(self, m: dict) -> None:
        self.step += 1
        self.images += m.get("images", 0) * self.world
        if not self.live or self.step % self.every:
            return
        now = time.perf_counter()
        self.tracker.log({"train/loss": m["loss"], "train/lr": m["lr"], "train/epoch": self.step / self.per_epoch,
                          "train/images_per_s": self.images / max(now - self.t_last, 1e-9)}, self.step)
        self.t_last, self.images = now, 0

    def on_constraint(self, constrainer, event: str) -> None:
        if not self.live:
            return
        st = constrainer.stats
        if event == "masks":
            kept = sum(int(m.sum()) for m in constrainer.masks.values())
            total = sum(m.numel() for m in constrainer.masks.values())
            self.tracker.log({"constraints/mask_changes": st["mask_changes"] - self.changes_seen,
                              "constraints/mask_updates": st["mask_updates"],
                              "constraints/density": kept / max(total, 1)}, self.step)
            self.changes_seen = st["mask_changes"]
        elif event == "codebooks":
            self.tracker.log({"constraints/codebook_refits": st["codebook_refits"]}, self.step)
        elif event == "admm":
            self.tracker.log({"constraints/admm_updates": st["admm_updates"],
                              "constraints/admm_residual": constrainer.admm_residual()}, self.step)

    def on_epoch(self, m: dict, step: int) -> None:
        if not self.live:
            return
        keys = {"loss": "train/epoch_loss", "train_acc": "train/acc", "images_per_s": "train/epoch_images_per_s",
                "top1": "test/top1", "top5": "test/top5", "test_loss": "test/loss", "epoch": "epoch",
                "density": "compression/density", "nominal_compression": "compression/nominal",
                "storage_compression": "compression/stored_bits"}
        out = {keys[k]: v for k, v in m.items() if k in keys}
        out.update({f"robust/{k.split(':', 1)[1]}": v for k, v in m.items() if k.startswith("robust:")})
        self.tracker.log(out, step)


def make_tracker(cfg: WandbConfig, run_dir: Path, pipeline: str, stage: str, config: dict, rank: int = 0):
    """The stage's tracker: W&B on rank 0 unless the mode resolves to disabled."""
    mode = resolve_mode(cfg)
    if rank != 0 or mode == "disabled":
        return NullTracker()
    return WandbTracker(cfg, mode, run_dir, pipeline, stage, config)
