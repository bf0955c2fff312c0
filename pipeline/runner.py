"""Run a pipeline's stages in order on this machine (the ``single`` cluster): each stage reads the
previous stage's checkpoint; a stage whose finished checkpoint exists is skipped, so rerunning
the same command continues where it stopped."""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

from elastictrain import checkpoint
from elastictrain.config import ConfigError, to_plain
from elastictrain.console import Console
from elastictrain.data import DataBundle
from elastictrain.data import load as load_data
from elastictrain.distributed.shards import check_shardable
from elastictrain.models import build_model
from elastictrain.models.fit import dry_forward
from elastictrain.train import Backend, Local
from jobs.cluster import check_answers

from .config import ClusterConfig, PipelineConfig, PipelineFile, load_pipeline, snapshot_pipeline
from .stage import Context, check_tightening, coupling_for, finished_checkpoint, plans_for, run_stage, stage_dir
from .tracking import resolve_mode


def _device(cluster: ClusterConfig) -> torch.device:
    local_ray = cluster.kind == "ray" and cluster.ray.address == "local"
    if local_ray and cluster.ray.gpus_per_worker > 0 and \
            torch.cuda.device_count() < cluster.ray.num_workers * cluster.ray.gpus_per_worker:
        raise ConfigError(f"cluster {cluster.name!r}: ray.gpus_per_worker: {cluster.ray.gpus_per_worker} × "
                          f"{cluster.ray.num_workers} workers asked for, but {torch.cuda.device_count()} GPUs "
                          "are visible")
    if cluster.device == "cuda" and not torch.cuda.is_available() and (cluster.kind == "single" or local_ray):
        raise ConfigError(f"cluster {cluster.name!r}: device: cuda asked for, but no GPU is visible")
    if cluster.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cluster.device)


def validate(cfg: PipelineConfig, num_classes: int, in_channels: int, sharded: bool = False,
             image_size: int = 32) -> None:
    """The model by name and one dry forward of an ``image_size`` batch through it (a model that
    does not fit the data is one line naming the layer), every stage's spec against the model's
    shapes (and, for coupled pruning, its graph), and the tightening rule — before any training. ``sharded`` (ZeRO-3):
    the constraints must be ones the projection can run on slices."""
    try:
        model = build_model(cfg.model.name, num_classes=num_classes, in_channels=in_channels)
    except ValueError as e:  # an unknown name; its message names the models there are
        raise ConfigError(str(e).replace("model: ", "model.name: ", 1)) from None
    dry_forward(model, torch.zeros(2, in_channels, image_size, image_size), f"model {cfg.model.name}")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    prev, prev_where = {}, ""
    coupled = None  # read off the graph once, for the first stage that needs it
    for i, stage in enumerate(cfg.stages):
        if coupled is None:
            coupled = coupling_for(stage, model, in_channels, image_size, f"stages[{i}]")
        if sharded and stage.spec is not None and stage.spec.coupled:
            raise ConfigError(f"stages[{i}].spec: prune.coupled: coupled filter pruning needs deepspeed.zero_stage "
                              "0–2 (it zeroes the BatchNorm entries of pruned channels, which ZeRO-3 partitions)")
        plans = plans_for(stage, shapes, f"stages[{i}]", coupled.groups if coupled is not None else None)
        if sharded and plans:
            if stage.enforce.method == "admm":
                raise ConfigError(f"stages[{i}].enforce.method: admm keeps whole-weight Z and U; "
                                  "it needs deepspeed.zero_stage 0–2, not 3")
            try:
                check_shardable(plans, f"stages[{i}].spec")
            except ValueError as e:
                raise ConfigError(f"{e} (deepspeed.zero_stage: 3)") from None
        if prev:
            check_tightening(prev, plans, f"stages[{i}]", prev_where)
        if plans:
            prev, prev_where = plans, f"stages[{i}] ({stage.name})"


def check_finished(cfg: PipelineConfig, run_dir: Path, num_classes: int, in_channels: int,
                   log=print) -> dict[str, dict]:
    """The finished stages in ``run_dir``, {stage name: checkpoint}, each read once. A finished
    stage is skipped and feeds the next stage, so it must hold this pipeline's model: a run
    directory reused with another model or data set is refused here, not when the next stage
    loads its weights."""
    want = {"model": cfg.model.name, "num_classes": num_classes, "in_channels": in_channels}
    shapes = None
    done = {}
    for stage in cfg.stages:
        path = Path(run_dir) / stage.name / "checkpoint.pt"
        ckpt = finished_checkpoint(path, log)
        if ckpt is None:
            continue
        differ = [f"{k} {ckpt[k]!r} (this pipeline: {v!r})" for k, v in want.items() if k in ckpt and ckpt[k] != v]
        if not differ:
            if shapes is None:
                model = build_model(cfg.model.name, num_classes=num_classes, in_channels=in_channels)
                shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
            sd = checkpoint.model_state(ckpt, str(path))
            differ = [f"{n} of shape {list(sd[n].shape) if n in sd else 'none'} (this pipeline: {list(s)})"
                      for n, s in shapes.items() if n not in sd or tuple(sd[n].shape) != s][:1]
        if differ:
            raise ConfigError(f"{path}: finished with {', '.join(differ)}; use another --out, "
                              "or delete that stage's folder to run it again")
        done[stage.name] = ckpt
    return done


def preflight(cfg: PipelineConfig, cluster: ClusterConfig, run_dir: Path, only: Optional[list[str]] = None,
              log=print, submitting: bool = False) -> tuple[Optional[DataBundle], dict[str, dict], torch.device]:
    """Everything checked before any work (``run``, and ``submit`` before anything is queued):
    stage names, the batch over the ranks, a head that answers, the data, the finished stages in
    ``run_dir``, the model (one dry forward) and every stage's spec. Returns (the data, {finished
    stage: checkpoint}, the device this process would use). Writes nothing.

    ``submitting``: the head is reached through its Jobs API, not here; data this host cannot
    read (it may live on the cluster only) is said in one line and its checks left to the job."""
    names = [s.name for s in cfg.stages]
    for n in only or []:
        if n not in names:
            raise ConfigError(f"--stages: no stage named {n!r} (stages: {', '.join(names)})")
    if cluster.kind == "ray" and cfg.data.batch_size % cluster.ray.num_workers:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} (the global batch) does not divide over "
                          f"ray.num_workers: {cluster.ray.num_workers} of cluster {cluster.name!r}")
    if cluster.kind == "ray" and cluster.ray.min_workers is not None:  # every size an elastic group may take
        step = cfg.data.batch_size * cluster.gradient_accumulation
        odd = [w for w in range(cluster.ray.min_workers, cluster.ray.num_workers + 1) if step % w]
        if odd:
            raise ConfigError(f"ray.min_workers: {cluster.ray.min_workers} of cluster {cluster.name!r}: "
                              f"{' and '.join(map(str, odd))} workers cannot share an optimizer step of {step} "
                              f"examples (data.batch_size × gradient_accumulation) equally")
    if cluster.kind == "ray" and cluster.ray.address != "local" and not submitting:  # say so now
        check_answers(cluster.ray.address, f"cluster {cluster.name!r}: ray.address", cluster.ray.connect_timeout_s)
    device = _device(cluster)
    try:
        bundle = load_data(cfg.data)
    except ValueError as e:  # a missing folder or a malformed file, named by the reader
        if submitting:
            log(f"not checked here (the job will): the model against the data, which this host cannot read ({e})")
            return None, {}, device
        raise ConfigError(str(e)) from None
    accumulation = cluster.gradient_accumulation
    if len(bundle.train) < cfg.data.batch_size * accumulation:  # (the loader would find it too, in a stage)
        limit = f" (data.limit_train: {cfg.data.limit_train})" if cfg.data.limit_train else ""
        times = f" × gradient_accumulation: {accumulation}" if accumulation > 1 else ""
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size}{times} is more than the {len(bundle.train)} "
                          f"training examples{limit}, so an epoch would have no step")
    done = check_finished(cfg, run_dir, bundle.num_classes, bundle.in_channels, log)
    try:
        sharded = cluster.kind == "ray" and cluster.deepspeed.zero_stage == 3
        validate(cfg, bundle.num_classes, bundle.in_channels, sharded=sharded, image_size=bundle.image_size)
    except ConfigError as e:
        raise ConfigError(f"pipeline {cfg.name!r}: {e}") from None
    for i, stage in enumerate(cfg.stages):
        if only is not None and stage.name not in only + list(done) and any(n in only for n in names[i + 1:]):
            raise ConfigError(f"--stages: stage {stage.name!r} must run first "
                              f"(no finished {Path(run_dir) / stage.name / 'checkpoint.pt'})")
    return bundle, done, device


def run_pipeline(cfg: PipelineConfig, cluster: ClusterConfig, run_dir: Path,
                 only: Optional[list[str]] = None, log=print, source: Optional[PipelineFile] = None,
                 console: Optional[Console] = None) -> list[dict]:
    """Run the stages in order on ``cluster``, once ``preflight`` passed. ``source`` (the file
    ``cfg`` was read from) is snapshotted to ``RUN_DIR/pipeline.yaml``; Ray workers load that
    snapshot and parse and validate it again on their side, and write their output to
    ``RUN_DIR/logs/STAGE/``. With a ``console`` (the command line's; it replaces ``log``), other
    libraries' output here goes to ``RUN_DIR/logs/driver.log`` (unless it is verbose: then Ray
    forwards the workers' output here too)."""
    log = console or log
    if cluster.kind == "ray" and source is None:
        raise ValueError("run_pipeline: a ray cluster needs the pipeline's source (workers load its snapshot)")
    mode = resolve_mode(cfg.tracking.wandb)  # here, once: workers see the same mode whatever their env
    cfg.tracking.wandb.mode = mode
    wandb_dir = cfg.tracking.wandb.dir or os.environ.get("WANDB_DIR") or None  # W&B's own setting wins over RUN_DIR
    if wandb_dir:
        cfg.tracking.wandb.dir = str(Path(wandb_dir).resolve())
    if cluster.threads and cluster.kind == "single":
        torch.set_num_threads(cluster.threads)
    bundle, done, device = preflight(cfg, cluster, run_dir, only, log)
    snapshot = None
    if source is not None:
        snapshot = snapshot_pipeline(source, Path(run_dir) / "pipeline.yaml", [f"tracking.wandb.mode={mode}"] + (
            [f"tracking.wandb.dir={cfg.tracking.wandb.dir}"] if cfg.tracking.wandb.dir else []))
    autocast = torch.bfloat16 if device.type == "cuda" and cfg.precision in ("auto", "bf16") else None
    backend = Local(device, autocast, cluster.gradient_accumulation)
    ctx = Context(cfg, bundle, Path(run_dir), backend, log=log, cluster=to_plain(cluster))
    with console.quiet(Path(run_dir) / "logs" / "driver.log") if console is not None else nullcontext():
        return _run_stages(ctx, cluster, done, only, snapshot, console.verbose if console is not None else False)


def _run_stages(ctx: Context, cluster: ClusterConfig, done: dict, only: Optional[list[str]],
                snapshot: Optional[Path], verbose: bool) -> list[dict]:
    cfg, run_dir, log = ctx.cfg, ctx.run_dir, ctx.log
    reports, previous = [], None
    for i, stage in enumerate(cfg.stages):
        path = stage_dir(ctx, stage) / "checkpoint.pt"
        selected = only is None or stage.name in only
        if stage.name in done:  # (a corrupt one was named by check_finished and is redone)
            log(f"[{stage.name}] finished earlier: {path} (skipped)")
            previous = done[stage.name]
            continue
        if not selected:
            continue
        if cluster.kind == "ray":
            from jobs.ray_train import run_stage_on_ray

            r = cluster.ray
            workers = f"{r.num_workers}" if r.min_workers is None else f"{r.min_workers}–{r.num_workers} (elastic)"
            log(f"[{stage.name}] {stage.kind}: {stage.epochs} epochs on {workers} Ray Train workers "
                f"(DeepSpeed ZeRO-{cluster.deepspeed.zero_stage})")
            args = {"pipeline": str(Path(snapshot).resolve()), "run_dir": str(Path(run_dir).resolve()),
                    "index": i, "cluster": to_plain(cluster)}
            run_stage_on_ray(stage_on_rank, args, cluster, f"{cfg.name}-{stage.name}",
                             Path(run_dir).resolve() / "logs" / stage.name, log, verbose)
            reports.append(json.loads((stage_dir(ctx, stage) / "report.json").read_text()))
        else:
            log(f"[{stage.name}] {stage.kind}: {stage.epochs} epochs on {ctx.backend.device}")
            reports.append(run_stage(ctx, i, previous))
        previous = checkpoint.load(path)
    return reports


def stage_on_rank(backend: Backend, args: dict, log) -> tuple[dict, Path]:
    """A Ray Train worker's stage (``jobs.ray_train`` calls it with the rank's backend and a
    ``log`` that reaches the driver's console from rank 0): the pipeline snapshot and the data are
    loaded here, the previous stage's checkpoint from shared storage. Returns the metrics Ray Train
    records and the checkpoint rank 0 wrote."""
    cfg = load_pipeline(args["pipeline"])
    index, run_dir = args["index"], Path(args["run_dir"])
    previous = checkpoint.load(run_dir / cfg.stages[index - 1].name / "checkpoint.pt") if index > 0 else None
    ctx = Context(cfg, load_data(cfg.data), run_dir, backend, log=log, cluster=args["cluster"])
    report = run_stage(ctx, index, previous)
    metrics = {k: report[k] for k in ("top1", "top5", "pruning_ratio", "nominal_compression", "seconds")}
    return metrics, stage_dir(ctx, cfg.stages[index]) / "checkpoint.pt"
