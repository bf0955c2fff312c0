"""Benchmark: what adversarial training buys — the same model, data, seed and epochs trained clean
and with the seed's ``adversarial_beta`` mix, then attacked with FGSM, PGD-7 and PGD-20.

Run from the repository root:

    .venv/bin/python bench/robust.py [--epochs 2] [--train 60000] [--test 2000] [--eps 0.1] [--quick]

SmallCNN on Fashion-MNIST through the pipeline (``dense_pretrain`` on the single-process cluster);
training attack PGD-``--train-steps`` at ``--eps`` (α = ε/4), beta 0.5; evaluation attacks in eval
mode on the first ``--test`` test images, ε the same, PGD with a random start (seeded).
Writes bench/results/robust.json at the default ε = 8/255 and robust-eps<ε>.json at another
(``--eps 0.1``: robust-eps0.1.json); ``--quick`` (5,000 images, 1 epoch, 500 attacked) writes the
same name with ``-quick`` appended, never the full results, and prints its rows as the last line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

DEFAULT_EPS = 8 / 255


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train", type=int, default=60000, help="training images (first N; default all 60,000)")
    ap.add_argument("--test", type=int, default=2000, help="test images attacked")
    ap.add_argument("--eps", type=float, default=DEFAULT_EPS)
    ap.add_argument("--train-steps", type=int, default=3, help="PGD steps of the training attack")
    ap.add_argument("--quick", action="store_true", help="5000 images, 1 epoch, 500 attacked (about a minute)")
    ap.add_argument("--out", default=None,
                    help="default bench/results/robust.json (robust-eps<EPS>.json at another --eps; "
                         "-quick appended with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.train, args.test = 1, 5000, 500
    from bench.machine import describe, out_path, write_result
    from elastictrain import checkpoint
    from elastictrain.data import DataConfig
    from elastictrain.data import load as load_data
    from elastictrain.data.loader import make_test_loader
    from elastictrain.models import build_model
    from elastictrain.train import evaluate
    from elastictrain.train.attacks import AttackConfig, robust_accuracy
    from pipeline.config import load_cluster, load_pipeline
    from pipeline.runner import run_pipeline

    torch.set_num_threads(2)
    data = {"name": "fashion-mnist", "batch_size": 128, "limit_train": args.train}
    train_attack = {"kind": "pgd", "eps": args.eps, "alpha": args.eps / 4, "steps": args.train_steps}
    attacks = [AttackConfig(kind="fgsm", eps=args.eps)] + [
        AttackConfig(kind="pgd", eps=args.eps, alpha=args.eps / 4, steps=k) for k in (7, 20)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, adv in (("clean", None), ("adversarial", {"beta": 0.5, "attack": train_attack, "eval_images": 0})):
            stage = {"name": "dense_pretrain", "epochs": args.epochs, "optimizer": {"lr": 0.05}}
            if adv:
                stage["adversarial"] = adv
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump({"name": name, "seed": 0, "model": {"name": "smallcnn"}, "data": data,
                                            "stages": [stage]}))
            cfg = load_pipeline(path)
            t0 = time.perf_counter()
            run_pipeline(cfg, load_cluster(ROOT / "configs/clusters/single.yaml"), Path(tmp) / name, log=print)
            train_s = time.perf_counter() - t0
            b = load_data(DataConfig(name="fashion-mnist", limit_test=args.test))
            model = build_model("smallcnn", num_classes=10, in_channels=1)
            ckpt = checkpoint.load(Path(tmp) / name / "dense_pretrain" / "checkpoint.pt")
            model.load_state_dict(checkpoint.model_state(ckpt))
            test = make_test_loader(b, DataConfig(name="fashion-mnist", limit_test=args.test), torch.device("cpu"))
            row = {"training": name, "train_seconds": train_s, "clean_top1": evaluate(model, test)["top1"]}
            for a in attacks:
                torch.manual_seed(0)
                row[a.name] = robust_accuracy(model, test, a, b.mean, b.std)["accuracy"]
            rows.append(row)
    m = describe()
    print(f"\n### Adversarial training — SmallCNN, Fashion-MNIST ({args.train} training images, {args.epochs} epochs), "
          f"ε = {args.eps:.4f} ({args.eps * 255:.1f}/255), {args.test} test images; {m['cpu_model']}, "
          f"{m['logical_cores']} cores\n")
    print("| training | clean top-1 | FGSM | PGD-7 | PGD-20 | training time |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['training']} | {r['clean_top1']:.2%} | {r['fgsm']:.2%} | {r['pgd-7']:.2%} | {r['pgd-20']:.2%} "
              f"| {r['train_seconds']:.0f} s |")
    result = {"machine": m, "model": "smallcnn", "data": "fashion-mnist", "epochs": args.epochs,
              "train_images": args.train, "test_images": args.test, "eps": args.eps, "train_attack": train_attack,
              "beta": 0.5, "rows": rows}
    write_result(result, out_path(args, "robust" if args.eps == DEFAULT_EPS else f"robust-eps{args.eps:g}"))
    if args.quick:
        print(json.dumps(result["rows"]))
    return result


if __name__ == "__main__":
    main()
