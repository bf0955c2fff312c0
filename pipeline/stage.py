"""One pipeline stage on one process: load the previous stage, train under the stage's spec,
bake the constraints in, evaluate, and write ``checkpoint.pt`` + ``report.json``.

Everything that can be wrong with a stage is checked by ``prepare`` before any training starts.
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from elastictrain import artifact, checkpoint
from elastictrain.accounting import report as accounting_report
from elastictrain.config import ConfigError, to_plain
from elastictrain.data import DataBundle, make_loaders
from elastictrain.models import build_model
from elastictrain.progress import Progress
from elastictrain.plan import LayerPlan, resolve
from elastictrain.projection import LayerState
from elastictrain.robust import attack, robust_accuracy
from elastictrain.train import Constrainer, Hooks, TorchStepper, build_optimizer, build_scheduler, evaluate, train_epoch
from elastictrain.verify import verify

from . import resume
from .artifacts import json_safe, write_json
from .config import PipelineConfig, StageConfig
from .report import write_stage_tables
from .tracking import StepMetrics, make_tracker

STAGE_FORMAT = "elastictrain.stage/1"


def torch_engine(model, opt, sched, stage: StageConfig, constrainer):
    """The single-process engine: the model itself for forward, a TorchStepper for the step."""
    return model, TorchStepper(model, opt, sched, stage.optimizer.clip_grad_norm)


@dataclass
class Context:
    cfg: PipelineConfig
    bundle: DataBundle
    device: torch.device
    autocast: Optional[torch.dtype]
    run_dir: Path
    world_size: int = 1
    rank: int = 0
    log: Callable[[str], None] = print
    make_engine: Callable = torch_engine
    """(model, optimizer, scheduler, stage, constrainer) → (forward module, stepper); ``jobs``
    passes one that wraps the model in a DeepSpeed engine."""
    reduce_metrics: Callable[[dict], dict] = lambda m: m
    """sums / averages per-rank metrics across ranks (identity on one process)."""
    state_dict: Callable[[torch.nn.Module], dict] = lambda model: {k: v.detach().cpu() for k, v in model.state_dict().items()}
    """the whole model's state (under ZeRO-3, ``jobs`` gathers the partitioned parameters)."""
    all_finite: Callable[[float], bool] = lambda x: math.isfinite(x)
    """whether a value is finite on *every* rank (so all ranks stop together, never one alone)."""
    barrier: Callable[[], None] = lambda: None
    """waits for every rank (resume points are committed after all ranks wrote theirs)."""
    cluster: Optional[dict] = None
    """the cluster config (plain), for the tracker's record of the run."""
    optimizer_state: Callable[[torch.optim.Optimizer], Optional[dict]] = lambda opt: opt.state_dict()
    """what the checkpoint keeps of the optimizer: None under DeepSpeed, whose ZeRO partitions it
    across ranks (one rank's slice alone would not restore anything)."""


class StageFailed(RuntimeError):
    """A stage stopped by a fault it cannot train through (NaN/Inf); the message is one line
    naming the stage, the fault and the last good resume point."""


def _last_good(sdir: Path, epoch: int) -> str:
    if epoch == 0:
        return "no epoch had completed, so there is no resume point; lower the LR or check the data"
    return (f"the last good state (after epoch {epoch}) is kept in {resume.points_dir(sdir)}; "
            "fix the cause (e.g. a lower LR) and rerun to resume from it")


def stage_dir(ctx: Context, stage: StageConfig) -> Path:
    return ctx.run_dir / stage.name


def is_finished(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return bool(checkpoint.load(path).get("local_dict", {}).get("finished", False))
    except checkpoint.UnsafeCheckpoint:
        raise  # tampered with: refused, never run again over
    except ConfigError:
        return False  # unreadable: run the stage again


def plans_for(cfg: PipelineConfig, stage: StageConfig, shapes: dict, where: str) -> dict[str, LayerPlan]:
    return resolve(stage.spec, shapes, f"{where}.spec") if stage.spec is not None else {}


def _keep_fraction(plan: LayerPlan) -> float:
    f = 1.0
    for s in plan.steps:
        f *= s.fraction
    if plan.pattern is not None:
        f *= plan.pattern.entries / (plan.shape4[2] * plan.shape4[3])
    return f


def check_tightening(prev: dict[str, LayerPlan], cur: dict[str, LayerPlan], where: str, prev_where: str) -> None:
    """A stage may tighten the previous stage's constraints, never loosen them silently."""
    for name, p in prev.items():
        c = cur.get(name)
        if c is None:
            raise ConfigError(f"{where}.spec: leaves {name} unconstrained, loosening {prev_where}")
        if _keep_fraction(c) > _keep_fraction(p) * (1 + 1e-9):
            raise ConfigError(f"{where}.spec: keeps {_keep_fraction(c):.4%} of {name}, more than "
                              f"{_keep_fraction(p):.4%} under {prev_where} (a later stage may only tighten)")
        if p.quantize is not None and (c.quantize is None or c.quantize.bits > p.quantize.bits):
            raise ConfigError(f"{where}.spec: {name} had {p.quantize.bits}-bit codes under {prev_where}; "
                              f"a later stage may not drop or widen them")


def run_stage(ctx: Context, index: int, previous: Optional[dict]) -> dict:
    """Train stage ``index``; returns its report. ``previous`` is the previous stage's checkpoint.
    Rank 0 tracks it as one W&B run (``pipeline.tracking``), finished as failed if the stage fails."""
    cfg, stage = ctx.cfg, ctx.cfg.stages[index]
    tracker = make_tracker(cfg.tracking.wandb, ctx.run_dir, cfg.name, stage.name, {
        "pipeline": json_safe(to_plain(cfg)), "stage": json_safe(to_plain(stage)), "stage_index": index,
        "cluster": json_safe(ctx.cluster or {}), "world_size": ctx.world_size, "device": str(ctx.device)}, ctx.rank)
    try:
        report = _run_stage(ctx, index, previous, tracker)
    except BaseException:
        tracker.finish(failed=True)
        raise
    out = stage_dir(ctx, stage)
    tracker.finish(report, files=(out / "checkpoint.pt", out / "model.etz"))
    return report


def _run_stage(ctx: Context, index: int, previous: Optional[dict], tracker) -> dict:
    cfg, stage = ctx.cfg, ctx.cfg.stages[index]
    where = f"stages[{index}]"
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed + index)
    b = ctx.bundle
    model = build_model(cfg.model.name, num_classes=b.num_classes, in_channels=b.in_channels).to(ctx.device)
    if previous is not None:
        model.load_state_dict(checkpoint.model_state(previous))
    params = dict(model.named_parameters())
    plans = plans_for(cfg, stage, {n: tuple(p.shape) for n, p in params.items()}, where)
    per_rank = dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size // ctx.world_size,
                                   eval_batch_size=max(1, cfg.data.eval_batch_size // ctx.world_size))
    train_loader, test_loader = make_loaders(b, per_rank, ctx.device, seed=cfg.seed + index, rank=ctx.rank,
                                             world_size=ctx.world_size)
    opt = build_optimizer(model, stage.optimizer)
    sched = build_scheduler(opt, stage.lr_schedule, len(train_loader), stage.epochs)
    constrainer = None
    if plans:
        prev_state = None
        if previous is not None:
            buf = checkpoint.buffers(previous)
            prev_state = {"masks": buf["weight_mask"], "libraries": buf["pattern_library"],
                          "codebooks": buf["quantization_table"]}
        constrainer = Constrainer(params, plans, stage.enforce, len(train_loader) * stage.epochs, prev_state)
    forward, stepper = ctx.make_engine(model, opt, sched, stage, constrainer)
    sdir = stage_dir(ctx, stage)
    owner = {"stage": resume.fingerprint(json_safe(to_plain(stage))), "world_size": ctx.world_size,
             "pipeline": resume.fingerprint(json_safe([cfg.seed, to_plain(cfg.model), to_plain(cfg.data)]))}
    history, start, resumed = [], 0, None
    point = resume.find_point(sdir, owner, ctx.log)
    if point is not None:  # continue after the last completed epoch, exactly as it was
        at, manifest = point
        stepper.load(at)
        saved = resume.load_state(at)
        if constrainer is not None:
            constrainer.resume(saved["constrainer"])
        resume.set_rng_state(saved["rng"])
        history, start = list(saved["history"]), int(saved["epoch"])
        resumed = {"epoch": start, "point": str(at), "checksum_saved": manifest.get("checksum"),
                   "checksum_restored": constrainer.checksum() if constrainer is not None else None}
        ctx.log(f"[{stage.name}] resumed after epoch {start}/{stage.epochs} from {at}")
    if constrainer is not None:
        constrainer.begin(opt)
    prog = Progress(cfg.tracking.progress, ctx.log, cfg.tracking.progress_every_s, f"[{stage.name}] ") if ctx.rank == 0 else None
    steps_per_epoch = len(train_loader)
    metrics = StepMetrics(tracker, cfg.tracking.wandb.log_every, steps_per_epoch, ctx.world_size)
    metrics.step = start * steps_per_epoch
    hooks = Hooks(on_step=metrics.on_step, progress=prog, finite=ctx.all_finite)
    adv = stage.adversarial
    if adv is not None:  # each rank attacks its own shard of the batch
        # through the module, not a DeepSpeed engine: an engine treats any backward through it —
        # the attack's input gradients included — as a training backward and reduces gradients
        hooks.adversarial = lambda _, x, y: attack(model, x, y, adv.attack, b.mean, b.std, ctx.autocast)
        hooks.adv_beta = adv.beta
    if constrainer is not None:
        constrainer.listeners.append(metrics.on_constraint)
    for epoch in range(start, stage.epochs):
        train_loader.set_epoch(epoch)
        hooks.desc = f"epoch {epoch + 1}/{stage.epochs}"
        try:
            m = train_epoch(forward, train_loader, stepper, constrainer, hooks, ctx.autocast)
        except FloatingPointError as e:
            raise StageFailed(f"[{stage.name}] stopped in epoch {epoch + 1}: {e}; {_last_good(sdir, epoch)}") from None
        with constrainer.effective() if constrainer is not None else nullcontext():
            m.update(evaluate(model, test_loader, ctx.autocast, prog))  # what the model is, not its latent weights
            now = ctx.state_dict(model) if plans else None  # (a collective under ZeRO-3: every rank calls it)
        m = ctx.reduce_metrics(m)
        m["epoch"] = epoch + 1
        if constrainer is not None:
            m["density"] = sum(int(x.sum()) for x in constrainer.masks.values()) / sum(x.numel() for x in constrainer.masks.values())
        if now is not None and ctx.rank == 0:
            acc = accounting_report(now, plans)
            m.update(nominal_compression=acc["nominal_compression"], storage_compression=acc["storage_compression"])
        history.append(m)
        metrics.on_epoch(m, (epoch + 1) * steps_per_epoch)
        ctx.log(f"[{stage.name}] epoch {epoch + 1}/{stage.epochs} loss {m['loss']:.4f} train {m['train_acc']:.2%} "
                f"test {m['top1']:.2%}" + (f" density {m['density']:.4f}" if "density" in m else "")
                + f" {m['images_per_s']:.0f} img/s {m['seconds']:.1f}s")
        if not ctx.all_finite(float(all(bool(torch.isfinite(p).all()) for p in model.parameters()))):
            raise StageFailed(f"[{stage.name}] stopped after epoch {epoch + 1}: the weights hold NaN/Inf; "
                              f"{_last_good(sdir, epoch)}")
        state = {"constrainer": constrainer.state_dict() if constrainer is not None else None, "history": history,
                 "rng": resume.rng_state(), "checksum": constrainer.checksum() if constrainer is not None else None}
        resume.save_point(sdir, epoch + 1, stepper, state, owner, ctx.rank, ctx.barrier)
    states = constrainer.finish() if constrainer is not None else {}
    final = evaluate(model, test_loader, ctx.autocast)
    if adv is not None and adv.eval_images:
        r = robust_accuracy(model, test_loader, adv.attack, b.mean, b.std, -(-adv.eval_images // ctx.world_size), ctx.autocast, prog)
        final.update({f"robust:{adv.attack.name}": r["accuracy"], "robust_images": r["images"]})
    final = ctx.reduce_metrics(final)
    sd = ctx.state_dict(model)
    weights = {n: sd[n] for n in plans}
    violations = verify(plans, weights, {n: s.library for n, s in states.items() if s.library is not None})
    if violations:  # the stage's own output must satisfy its spec; anything else is a bug
        raise RuntimeError(f"{where}: output violates its spec: " + "; ".join(map(str, violations[:3])))
    rep = accounting_report(sd, plans)
    report = {"format": STAGE_FORMAT, "pipeline": cfg.name, "stage": stage.name, "kind": stage.kind,
              "model": cfg.model.name, "data": cfg.data.name, "top1": final["top1"], "top5": final["top5"],
              "test_loss": final["test_loss"], "world_size": ctx.world_size,
              "robust": {k.split(":", 1)[1]: v for k, v in final.items() if k.startswith("robust:")},
              "seconds": time.perf_counter() - t0, "epochs": stage.epochs, "history": history, "resumed": resumed,
              "constraint_stats": constrainer.stats if constrainer else {}, **rep}
    states_cpu = {n: _cpu_state(s) for n, s in states.items()}
    ckpt = checkpoint.compressed_checkpoint(
        sd, states_cpu, to_plain(stage.spec) if stage.spec is not None else None, previous=previous, epoch=stage.epochs,
        extra={"pipeline": cfg.name, "stage": stage.name, "kind": stage.kind, "model": cfg.model.name,
               "num_classes": b.num_classes, "in_channels": b.in_channels,
               "optimizer_state_dict": ctx.optimizer_state(opt),
               "report": json_safe({k: v for k, v in report.items() if k not in ("layers", "history")})})
    ckpt["local_dict"].update({"finished": True, "step": constrainer.step if constrainer else len(train_loader) * stage.epochs})
    if ctx.rank == 0:  # every rank holds the same weights and state; one writes
        out = stage_dir(ctx, stage)
        packed = artifact.export(ckpt, out / "model.etz", progress=prog)  # the honest size beside the nominal ratio
        report.update(artifact_bytes=packed["bytes"], artifact_weights_bytes=packed["weights_bytes"],
                      honest_compression=packed["honest_compression"], artifact_model_compression=packed["model_compression"])
        write_json(report, out / "report.json")
        write_stage_tables(out, report, sd, plans)  # layers.parquet (recounted from the weights) + report.md
        checkpoint.atomic_save(ckpt, out / "checkpoint.pt")  # last: a finished checkpoint means every output is there
        resume.clear(out)
    return report


def _cpu_state(s: LayerState) -> LayerState:
    return LayerState(mask=s.mask.cpu(), unit_masks=[m.cpu() if m is not None else None for m in s.unit_masks],
                      library=s.library.cpu() if s.library is not None else None,
                      codebook=s.codebook.cpu() if s.codebook is not None else None)
