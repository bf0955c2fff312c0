"""One pipeline stage on one process: load the previous stage, train under the stage's spec,
bake the constraints in, evaluate, and write ``checkpoint.pt`` + ``report.json``.

Everything that can be wrong with a stage is checked by ``prepare`` before any training starts.
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from elastictrain import artifact, checkpoint, compress
from elastictrain.config import ConfigError, to_plain
from elastictrain.constraints.plan import LayerPlan, resolve
from elastictrain.constraints.projection import LayerState
from elastictrain.data import DataBundle, make_loaders
from elastictrain.data.shard import mix_seed
from elastictrain.deploy import Coupling, coupling
from elastictrain.files import json_safe, write_json
from elastictrain.measure.accounting import report as accounting_report
from elastictrain.models import build_model
from elastictrain.progress import Progress
from elastictrain.train import (
    Backend,
    Constrainer,
    Hooks,
    StageFailed,
    Teacher,
    build_optimizer,
    build_scheduler,
    evaluate,
    step_split,
    train_epoch,
)
from elastictrain.train.attacks import attack, robust_accuracy

from . import resume
from .config import PipelineConfig, StageConfig
from .report import write_stage_tables
from .tracking import StepMetrics, make_tracker

STAGE_FORMAT = "elastictrain.stage/1"


@dataclass
class Context:
    """What a stage runs with: the pipeline, its data, where it writes, and the backend — one
    process (``elastictrain.train.Local``) or one DeepSpeed rank (``jobs.backend``)."""

    cfg: PipelineConfig
    bundle: DataBundle
    run_dir: Path
    backend: Backend
    log: Callable[[str], None] = print
    cluster: Optional[dict] = None
    """the cluster config (plain), for the tracker's record of the run."""

    @property
    def rank(self) -> int:
        return self.backend.rank

    @property
    def world_size(self) -> int:
        return self.backend.world_size

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def autocast(self) -> Optional[torch.dtype]:
        return self.backend.autocast


def _last_good(sdir: Path, epoch: int) -> str:
    if epoch == 0:
        return "no epoch had completed, so there is no resume point; lower the LR or check the data"
    return (f"the last good state (after epoch {epoch}) is kept in {resume.points_dir(sdir)}; "
            "fix the cause (e.g. a lower LR) and rerun to resume from it")


def stage_dir(ctx: Context, stage: StageConfig) -> Path:
    return ctx.run_dir / stage.name


def finished_checkpoint(path: Path, log: Optional[Callable[[str], None]] = None) -> Optional[dict]:
    """The stage's checkpoint if it finished, else None. One that is corrupt or cut off counts as
    unfinished (the stage runs again; ``log`` names why); one carrying code is refused."""
    if not path.is_file():
        return None
    try:
        ckpt = checkpoint.load(path)
    except checkpoint.UnsafeCheckpoint:
        raise  # tampered with: refused, never run again over
    except ConfigError as e:  # unreadable: run the stage again
        if log is not None:
            log(f"[{path.parent.name}] {e}; running the stage again")
        return None
    return ckpt if ckpt.get("local_dict", {}).get("finished", False) else None


def is_finished(path: Path) -> bool:
    return finished_checkpoint(path) is not None


def coupling_for(stage: StageConfig, model: torch.nn.Module, in_channels: int, image_size: int,
                 where: str) -> Optional[Coupling]:
    """The model's coupled filter groups, read off its graph on one blank image — for a spec that
    prunes coupled filters; None for any other."""
    if stage.spec is None or not stage.spec.coupled:
        return None
    x = torch.zeros(1, in_channels, image_size, image_size, device=next(model.parameters()).device)
    try:
        return coupling(model, x)
    except ValueError as e:  # untraceable, or the images do not fit: named by deploy.graph
        raise ConfigError(f"{where}.spec: prune.coupled reads the channel groups off the model's graph: {e}") from None


def plans_for(stage: StageConfig, shapes: dict, where: str, couplings: Optional[list] = None) -> dict[str, LayerPlan]:
    return resolve(stage.spec, shapes, f"{where}.spec", couplings) if stage.spec is not None else {}


def followers_for(plans: dict[str, LayerPlan], coupled: Optional[Coupling]) -> dict[str, list[str]]:
    """The BatchNorm entries and biases the constrainer masks: those whose weights all prune coupled."""
    if coupled is None:
        return {}
    mine = {n for n, p in plans.items() if any(s.scope == "coupled" for s in p.steps)}
    return {f: ws for f, ws in coupled.followers.items() if set(ws) <= mine}


def check_tightening(prev: dict[str, LayerPlan], cur: dict[str, LayerPlan], where: str, prev_where: str) -> None:
    """A stage may tighten the previous stage's constraints, never loosen them silently."""
    for name, p in prev.items():
        c = cur.get(name)
        if c is None:
            raise ConfigError(f"{where}.spec: leaves {name} unconstrained, loosening {prev_where}")
        if c.weight_density > p.weight_density * (1 + 1e-9):
            raise ConfigError(f"{where}.spec: keeps {c.weight_density:.4%} of {name}, more than "
                              f"{p.weight_density:.4%} under {prev_where} (a later stage may only tighten)")
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


def set_dropout(model: torch.nn.Module, p: float) -> int:
    """Every dropout layer of ``model`` drops with probability ``p``; returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    for m in layers:
        m.p = p
    return len(layers)


def _run_stage(ctx: Context, index: int, previous: Optional[dict], tracker) -> dict:
    cfg, stage = ctx.cfg, ctx.cfg.stages[index]
    where = f"stages[{index}]"
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed + index)
    b = ctx.bundle
    model = build_model(cfg.model.name, num_classes=b.num_classes, in_channels=b.in_channels).to(ctx.device)
    if previous is not None:
        model.load_state_dict(checkpoint.model_state(previous))
    if stage.dropout is not None:
        set_dropout(model, stage.dropout)
    params = dict(model.named_parameters())
    coupled = coupling_for(stage, model, b.in_channels, b.image_size, where)
    plans = plans_for(stage, {n: tuple(p.shape) for n, p in params.items()}, where,
                      coupled.groups if coupled is not None else None)
    backend = ctx.backend
    # an optimizer step takes the same examples on any world size (an elastic group that lost
    # workers accumulates more micro-batches), so a resume point continues on any world size
    micro, accumulation = step_split(cfg.data.batch_size, backend.accumulation, backend.nominal_world,
                                     ctx.world_size)
    per_rank = dataclasses.replace(cfg.data, batch_size=micro,
                                   eval_batch_size=max(1, cfg.data.eval_batch_size // ctx.world_size))
    train_loader, test_loader = make_loaders(b, per_rank, ctx.device, seed=cfg.seed + index, rank=ctx.rank,
                                             world_size=ctx.world_size, micro_batches=accumulation)
    opt = build_optimizer(model, stage.optimizer)
    steps_per_epoch = len(train_loader) // accumulation  # optimizer steps (see train_epoch)
    sched = build_scheduler(opt, stage.lr_schedule, steps_per_epoch, stage.epochs)
    constrainer = None
    if plans:
        prev_state = None
        if previous is not None:
            buf = checkpoint.buffers(previous)
            prev_state = {"masks": buf["weight_mask"], "libraries": buf["pattern_library"],
                          "codebooks": buf["quantization_table"]}
        constrainer = Constrainer(params, plans, stage.enforce, steps_per_epoch * stage.epochs, prev_state,
                                  followers=followers_for(plans, coupled), micro_batches=accumulation)
    forward, stepper = backend.engine(model, opt, sched, constrainer, batch_per_rank=micro,
                                      clip=stage.optimizer.clip_grad_norm, accumulation=accumulation)
    sdir = stage_dir(ctx, stage)
    owner = {"stage": resume.fingerprint(json_safe(to_plain(stage))),  # (not the world size: see step_split)
             "pipeline": resume.fingerprint(json_safe([cfg.seed, to_plain(cfg.model), to_plain(cfg.data)])),
             "step_batch": cfg.data.batch_size * backend.accumulation}
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
                   "checksum_restored": constrainer.checksum() if constrainer is not None else None,
                   "world_size_saved": saved.get("world_size"), "world_size": ctx.world_size}
        moved = "" if saved.get("world_size") == ctx.world_size else (
            f" (saved by {saved.get('world_size')} ranks; now {ctx.world_size} × {accumulation} micro-batches a step)")
        ctx.log(f"[{stage.name}] resumed after epoch {start}/{stage.epochs} from {at}{moved}")
    if constrainer is not None:
        for event in constrainer.begin(opt):
            backend.after_update(constrainer, event)
    prog = None
    if ctx.rank == 0:
        prog = Progress(cfg.tracking.progress, ctx.log, cfg.tracking.progress_every_s, f"[{stage.name}] ")
    metrics = StepMetrics(tracker, cfg.tracking.wandb.log_every, steps_per_epoch, ctx.world_size)
    metrics.step = start * steps_per_epoch
    teacher, taught_by = _teacher(ctx, stage) if stage.distill is not None else (None, None)
    hooks = Hooks(on_step=metrics.on_step, progress=prog, finite=backend.all_finite, teacher=teacher)
    adv = stage.adversarial
    if adv is not None:  # each rank attacks its own shard of the batch
        # through the module, not a DeepSpeed engine: an engine treats any backward through it —
        # the attack's input gradients included — as a training backward and reduces gradients
        hooks.adversarial = lambda _, x, y: attack(model, x, y, adv.attack, b.mean, b.std, ctx.autocast)
        hooks.adv_beta = adv.beta
    if constrainer is not None:
        def after_update(event: str) -> None:  # every rank: the backend's part (re-mask, rank check), then metrics
            backend.after_update(constrainer, event)
            metrics.on_constraint(constrainer, event)

        hooks.on_update = after_update
    at_epoch = {"epoch": start}

    def seed_micro_batch(step: int, micro: int) -> None:
        # its dropout and attack noise from (seed, epoch, step, data shard): the same on any world size
        torch.manual_seed(mix_seed(cfg.seed + index, at_epoch["epoch"], step, ctx.rank + ctx.world_size * micro))

    hooks.before_micro_batch = seed_micro_batch
    for epoch in range(start, stage.epochs):
        at_epoch["epoch"] = epoch
        train_loader.set_epoch(epoch)
        hooks.desc = f"epoch {epoch + 1}/{stage.epochs}"
        try:
            m = train_epoch(forward, train_loader, stepper, constrainer, hooks, ctx.autocast)
        except FloatingPointError as e:
            raise StageFailed(f"[{stage.name}] stopped in epoch {epoch + 1}: {e}; {_last_good(sdir, epoch)}") from None
        with constrainer.effective() if constrainer is not None else nullcontext():
            m.update(evaluate(model, test_loader, ctx.autocast, prog))  # what the model is, not its latent weights
            now = backend.state_dict(model) if plans else None  # (a collective under ZeRO-3: every rank calls it)
        m = backend.reduce_metrics(m)
        m.update(epoch=epoch + 1, world_size=ctx.world_size)
        if constrainer is not None:
            masks = constrainer.masks.values()
            m["density"] = sum(int(x.sum()) for x in masks) / sum(x.numel() for x in masks)
            m["checksum"] = constrainer.checksum()  # masks + codebooks after this epoch (compare runs by it)
        if now is not None and ctx.rank == 0:
            acc = accounting_report(now, plans)
            m.update(nominal_compression=acc["nominal_compression"], storage_compression=acc["storage_compression"])
        history.append(m)
        metrics.on_epoch(m, (epoch + 1) * steps_per_epoch)
        ctx.log(f"[{stage.name}] epoch {epoch + 1}/{stage.epochs} loss {m['loss']:.4f} train {m['train_acc']:.2%} "
                f"test {m['top1']:.2%}" + (f" density {m['density']:.4f}" if "density" in m else "")
                + f" {m['images_per_s']:.0f} img/s {m['seconds']:.1f}s")
        if not backend.all_finite(float(all(bool(torch.isfinite(p).all()) for p in model.parameters()))):
            raise StageFailed(f"[{stage.name}] stopped after epoch {epoch + 1}: the weights hold NaN/Inf; "
                              f"{_last_good(sdir, epoch)}")
        state = {"constrainer": constrainer.state_dict() if constrainer is not None else None, "history": history,
                 "rng": resume.rng_state(), "checksum": constrainer.checksum() if constrainer is not None else None,
                 "world_size": ctx.world_size}
        resume.save_point(sdir, epoch + 1, stepper, state, owner, ctx.rank, backend.barrier)
    states = constrainer.finish() if constrainer is not None else {}
    final = evaluate(model, test_loader, ctx.autocast)
    if adv is not None and adv.eval_images:
        per_rank_images = -(-adv.eval_images // ctx.world_size)
        r = robust_accuracy(model, test_loader, adv.attack, b.mean, b.std, per_rank_images, ctx.autocast, prog)
        final.update({f"robust:{adv.attack.name}": r["accuracy"], "robust_images": r["images"]})
    final = backend.reduce_metrics(final)
    sd = backend.state_dict(model)
    result = compress.finish(sd, {n: _cpu_state(s) for n, s in states.items()}, plans)
    report = {"format": STAGE_FORMAT, "pipeline": cfg.name, "stage": stage.name, "kind": stage.kind,
              "model": cfg.model.name, "data": cfg.data.name, "top1": final["top1"], "top5": final["top5"],
              "test_loss": final["test_loss"], "world_size": ctx.world_size,
              "robust": {k.split(":", 1)[1]: v for k, v in final.items() if k.startswith("robust:")},
              "seconds": time.perf_counter() - t0, "epochs": stage.epochs, "history": history, "resumed": resumed,
              "constraint_stats": constrainer.stats if constrainer else {}, "distill": taught_by, **result.report}
    ckpt = result.checkpoint(
        to_plain(stage.spec) if stage.spec is not None else None, previous=previous, epoch=stage.epochs,
        extra={"pipeline": cfg.name, "stage": stage.name, "kind": stage.kind, "model": cfg.model.name,
               "num_classes": b.num_classes, "in_channels": b.in_channels, "distill": taught_by,
               "optimizer_state_dict": backend.optimizer_state(opt),
               "report": json_safe({k: v for k, v in report.items() if k not in ("layers", "history")}),
               **({"couplings": coupled.groups} if coupled is not None else {})},  # for checkpoint.plans
        where=where)  # checked: the stage's own output must satisfy its spec; anything else is a bug
    steps = constrainer.step if constrainer else steps_per_epoch * stage.epochs
    ckpt["local_dict"].update({"finished": True, "step": steps})
    if ctx.rank == 0:  # every rank holds the same weights and state; one writes
        out = stage_dir(ctx, stage)
        packed = artifact.export(ckpt, out / "model.etz", progress=prog)  # the honest size beside the nominal ratio
        report.update(artifact_bytes=packed["bytes"], artifact_weights_bytes=packed["weights_bytes"],
                      honest_compression=packed["honest_compression"],
                      artifact_model_compression=packed["model_compression"])
        write_json(report, out / "report.json")
        write_stage_tables(out, report, sd, plans)  # layers.parquet (recounted from the weights) + report.md
        checkpoint.atomic_save(ckpt, out / "checkpoint.pt")  # last: a finished checkpoint means every output is there
        resume.clear(out)
    return report


def _teacher(ctx: Context, stage: StageConfig) -> tuple[Teacher, dict]:
    """The frozen teacher of a distilling stage, on this rank's device (a whole replica on every
    rank), and its reference for the checkpoint: which stage, which file, its digest."""
    path = ctx.run_dir / stage.distill.teacher / "checkpoint.pt"
    ckpt = finished_checkpoint(path, ctx.log)
    if ckpt is None:
        raise ConfigError(f"{stage.name}: distill.teacher {stage.distill.teacher!r} has not finished ({path})")
    b = ctx.bundle
    model = build_model(ctx.cfg.model.name, num_classes=b.num_classes, in_channels=b.in_channels).to(ctx.device)
    model.load_state_dict(checkpoint.model_state(ckpt, str(path)))
    ref = {"teacher": stage.distill.teacher, "checkpoint": str(path), "sha256": checkpoint.file_digest(path),
           "alpha": stage.distill.alpha, "temperature": stage.distill.temperature}
    return Teacher(model, stage.distill), ref


def _cpu_state(s: LayerState) -> LayerState:
    return LayerState(mask=s.mask.cpu(), unit_masks=[m.cpu() if m is not None else None for m in s.unit_masks],
                      library=s.library.cpu() if s.library is not None else None,
                      codebook=s.codebook.cpu() if s.codebook is not None else None)
