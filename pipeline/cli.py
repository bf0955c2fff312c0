"""The ``elastictrain`` command. Each subcommand validates everything it was given before it
starts work, and user errors print one line (``elastictrain: error: WHERE: WHY``) and exit 2."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from elastictrain import checkpoint
from elastictrain.config import ConfigError, to_plain
from elastictrain.console import Console
from elastictrain.constraints import spec as spec_mod
from elastictrain.files import json_safe, write_json
from elastictrain.measure.accounting import format_table

from .stage import StageFailed


def cmd_init(args) -> int:
    import torch

    from elastictrain.models import build_model

    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels)
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "model_state_dict": model.state_dict(),
                            "local_dict": {"epoch": 0}, "model": args.model, "num_classes": args.num_classes,
                            "in_channels": args.in_channels}, args.out)
    print(f"wrote {args.out}: {args.model}, {sum(p.numel() for p in model.parameters())} parameters")
    return 0


def cmd_compress(args) -> int:
    from elastictrain.compress import compress_state_dict

    spec = spec_mod.load(args.spec)  # spec errors first: before any tensor is read
    if spec.coupled:
        raise ConfigError(f"{args.spec}: prune.coupled reads channel groups off the model's graph and masks "
                          "BatchNorm entries as it trains: use it in a pipeline stage, not one-shot compress")
    ckpt = checkpoint.load(args.checkpoint)
    sd = checkpoint.model_state(ckpt, args.checkpoint)
    result = compress_state_dict(sd, spec, str(args.spec))
    out = result.checkpoint(to_plain(spec), previous=ckpt if "elastic_trainer_state_dict" in ckpt else None,
                            extra={"report": json_safe({k: v for k, v in result.report.items() if k != "layers"}),
                                   **{k: ckpt[k] for k in ("model", "num_classes", "in_channels") if k in ckpt}})
    checkpoint.atomic_save(out, args.out)
    if args.report:
        write_json({"checkpoint": str(args.out), "spec": str(args.spec), **result.report}, args.report)
    if not args.quiet:
        print(format_table(result.report))
        print(f"wrote {args.out}" + (f" and {args.report}" if args.report else ""))
    return 0


def cmd_verify(args) -> int:
    from elastictrain.constraints.plan import resolve
    from elastictrain.constraints.verify import verify

    spec = spec_mod.load(args.spec)
    ckpt = checkpoint.load(args.checkpoint)
    sd = checkpoint.model_state(ckpt, args.checkpoint)
    plans = resolve(spec, {k: tuple(v.shape) for k, v in sd.items()}, str(args.spec), ckpt.get("couplings"))
    violations = verify(plans, sd, checkpoint.buffers(ckpt)["pattern_library"])
    for v in violations:
        print(f"FAIL {v}")
    print(f"{args.checkpoint}: {len(plans)} constrained tensors, "
          + ("all constraints hold" if not violations else f"{len(violations)} violations"))
    return 1 if violations else 0


def cmd_run(args) -> int:
    from .config import load_cluster, read_pipeline
    from .runner import run_pipeline

    source = read_pipeline(args.pipeline, args.set)  # the one read of the file in this process
    cfg = source.cfg
    cluster = load_cluster(args.cluster)
    run_dir = Path(args.out) if args.out else Path("runs") / cfg.name
    only = [s for s in args.stages.split(",") if s] if args.stages else None
    reports = run_pipeline(cfg, cluster, run_dir, only, source=source, console=Console(verbose=args.verbose))
    final = reports[-1] if reports else None
    if final is None:
        print(f"{run_dir}: every stage had finished already")
        return 0
    print(f"\n{cfg.name}: final stage {final['stage']!r} — top-1 {final['top1']:.2%}, top-5 {final['top5']:.2%}")
    print(format_table(final))
    print(f"run directory: {run_dir}")
    return 0


def cmd_eval(args) -> int:
    from elastictrain.train.attacks import parse_attacks

    from .evaluate import EvalRequest, parse_rename, run_eval

    attacks = parse_attacks(args.attacks, args.eps) if args.attacks else []
    if attacks and not args.data:
        raise ConfigError("--attacks: needs --data (robust accuracy is measured on test images)")
    run_eval(EvalRequest(Path(args.checkpoint), model=args.model, data=args.data, data_root=args.data_root,
                         pad_to=args.pad_to, limit_test=args.limit_test, batch_size=args.batch_size, device=args.device,
                         attacks=attacks, attack_images=args.attack_images or None, unit=args.unit,
                         balance=args.balance, groups=args.groups, rename=parse_rename(args.rename or ""),
                         json=Path(args.json) if args.json else None,
                         plots=Path(args.plots) if args.plots else None, runtime=args.runtime))
    return 0


def cmd_export(args) -> int:
    from elastictrain import artifact

    ckpt = checkpoint.load(args.checkpoint)
    checkpoint.model_state(ckpt, args.checkpoint)
    info = artifact.export(ckpt, args.out)
    if info["outside_mask"]:
        n, layers = sum(info["outside_mask"].values()), len(info["outside_mask"])
        print(f"elastictrain: warning: {args.checkpoint}: {n:,} non-zero weights in {layers} layer(s) lay outside "
              f"their weight_mask (first: {next(iter(info['outside_mask']))}); exported as weight × mask, the model "
              "the masks define", file=sys.stderr)
    head = f"{'layer':<24}{'params':>11}{'kept':>10}  {'mask':<22}{'values':<14}{'bytes':>10}"
    print("\n".join([head, "-" * len(head)] + [
        f"{l['name'][:24]:<24}{l['params']:>11}{l['kept']:>10}  {l['mask'][:22]:<22}{l['values'][:14]:<14}"
        f"{l['bytes']:>10}"
        for l in info["layers"]]))
    print(f"{args.out}: {info['bytes']:,} bytes — weights {info['weights_bytes']:,}, BN/biases {info['other_bytes']:,} "
          f"({info['bn_dtype']}), header {info['header_bytes']:,}; honest ratio {info['honest_compression']:,.1f}× "
          f"(weights), {info['model_compression']:,.1f}× (whole model)")
    return 0


def cmd_deploy(args) -> int:
    from .deploy import DeployRequest, run_deploy

    run_deploy(DeployRequest(Path(args.checkpoint), Path(args.out), formats=args.format,
                             input_shape=args.input_shape, model=args.model, align=args.align,
                             tune_batch=args.tune_batch))
    return 0


def cmd_submit(args) -> int:
    from .submit import submit

    submit(args.pipeline, args.cluster, args.out, args.dry_run, overrides=args.set, force=args.force)
    return 0


def cmd_status(args) -> int:
    from .submit import status

    status(args.run_dir)
    return 0


def cmd_report(args) -> int:
    from .report import run_report

    print(run_report([Path(d) for d in args.run_dirs], Path(args.out) if args.out else None), end="")
    return 0


def _set_option(s: argparse.ArgumentParser) -> None:
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline field (repeatable): data.limit_train=1000, stages.*.epochs=1, "
                        "stages.quantize.optimizer.lr=0.005 — the run directory keeps the resolved pipeline.yaml")


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as one line too (``elastictrain: error: eval: argument …``)."""

    def error(self, message: str):
        command = self.prog.removeprefix("elastictrain").strip()
        raise ConfigError(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="elastictrain", description="Train and compress DNNs under a mixture of constraints.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="write a freshly initialised model checkpoint")
    s.add_argument("model")
    s.add_argument("--out", required=True)
    s.add_argument("--num-classes", type=int, default=10)
    s.add_argument("--in-channels", type=int, default=3)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("compress", help="project a model's weights onto a spec in one shot (no training)")
    s.add_argument("checkpoint")
    s.add_argument("--spec", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--report", help="write the JSON compression report here")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_compress)

    s = sub.add_parser("run", help="run a pipeline's stages (dense pretrain → prune → quantize → fine-tune)")
    s.add_argument("pipeline")
    s.add_argument("--cluster",
                   help="cluster config (default: configs/clusters/local.yaml — in-process Ray, 2 workers)")
    s.add_argument("--out", help="run directory (default: runs/<pipeline name>)")
    s.add_argument("--stages", help="comma-separated stage names to run (earlier ones must have finished)")
    s.add_argument("-v", "--verbose", action="store_true",
                   help="show other libraries' output and every Ray worker's live (default: in RUN_DIR/logs/)")
    _set_option(s)
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("eval", help="accuracy, robust accuracy and compression statistics of a checkpoint or .etz "
                                    "(accuracy of a deployed .pt2 / .onnx)")
    s.add_argument("checkpoint")
    s.add_argument("--data", help="data set name (fashion-mnist, mnist, cifar10, cifar100, imagefolder); "
                                  "without it only compression statistics are reported")
    s.add_argument("--data-root", help="folder holding the data set's files")
    s.add_argument("--pad-to", type=int, help="zero-pad images to this side (e.g. 32 for 28×28 data on VGG)")
    s.add_argument("--limit-test", type=int, help="use only the first N test images")
    s.add_argument("--batch-size", type=int, default=512)
    s.add_argument("--model", help="model name when the checkpoint records none (the seed's checkpoints)")
    s.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    s.add_argument("--attacks", help="comma-separated: fgsm, pgd (PGD-7), pgd-20, pgd-50 …")
    s.add_argument("--eps", type=float, default=8 / 255, help="L∞ radius in pixel units (default 8/255)")
    s.add_argument("--attack-images", type=int, default=1000, help="test images attacked (0 = all)")
    s.add_argument("--unit", help="structured statistics: units entirely zero (kernel, filter, channel or a grid)")
    s.add_argument("--balance", help="workload balance for a grid, e.g. '{filter: 16, channel: 4}'")
    s.add_argument("--groups", help="codebook statistics for a grid: unique values per group")
    s.add_argument("--rename", help="map parameter names of another model definition onto ours: "
                                    "'shortcut.=downsample.,linear.=fc.'")
    s.add_argument("--json", help="write everything as JSON here")
    s.add_argument("--plots", help="write weights.png (non-zero histograms) and density.png here")
    s.add_argument("--runtime", action="store_true",
                   help="run the model as `deploy --format runtime` does: pruned channels removed, BN folded, "
                        "each layer's fastest exact implementation on this machine")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("export", help="write a checkpoint as a packed .etz artifact (its bytes: the honest ratio)")
    s.add_argument("checkpoint")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("deploy", help="a checkpoint or .etz as a physically smaller model: .pt2 (torch.export) "
                                      "and .onnx, pruned channels removed, BatchNorm folded")
    s.add_argument("checkpoint")
    s.add_argument("--out", required=True, help="folder for model.pt2, model.onnx and deploy.json (written atomically)")
    s.add_argument("--format", default="torch,onnx",
                   help="comma-separated: torch (.pt2), onnx, runtime (.runtime.pt2: sparse layers computed "
                        "sparsely, each layer's implementation tuned on this machine) (default: torch,onnx)")
    s.add_argument("--tune-batch", type=int, default=64, metavar="N", help="batch size the runtime format is tuned for")
    s.add_argument("--input-shape", metavar="C,H,W",
                   help="one image's shape (default: the checkpoint's data set's, e.g. 1,28,28 for Fashion-MNIST)")
    s.add_argument("--model", help="model name when the checkpoint records none (the seed's checkpoints)")
    s.add_argument("--align", type=int, default=1, metavar="N",
                   help="keep every channel group's width a multiple of N (zero channels kept back; exact): "
                        "8 or 16 suits CPU blocked layouts and GPU tensor cores (default 1: remove all)")
    s.set_defaults(fn=cmd_deploy)

    s = sub.add_parser("submit", help="submit a pipeline's unfinished stages to a Slurm or Ray cluster")
    s.add_argument("pipeline")
    s.add_argument("--cluster", required=True, help="a kind: slurm cluster, or kind: ray with ray.job_server")
    s.add_argument("--out", help="run directory (default: <cluster storage>/<pipeline name>; shared storage)")
    s.add_argument("--dry-run", action="store_true", help="print the job scripts instead of submitting")
    s.add_argument("--force", action="store_true",
                   help="submit even while jobs recorded for this run directory are still queued or running")
    _set_option(s)
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser("status", help="each stage's state of a submitted run")
    s.add_argument("run_dir")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("report", help="one seed-shaped table (and plots) of every finished stage of one or more runs")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    s.add_argument("--out", help="folder for report.md and the PNG plots (default: the first RUN_DIR's report/)")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("verify", help="check a checkpoint's weights against a spec")
    s.add_argument("checkpoint")
    s.add_argument("--spec", required=True)
    s.set_defaults(fn=cmd_verify)
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"elastictrain: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    try:
        args = parser().parse_args(argv)
        return args.fn(args)
    except ConfigError as e:
        print(f"elastictrain: error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:  # a fault met while training: the last good state is kept
        print(f"elastictrain: stage failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
