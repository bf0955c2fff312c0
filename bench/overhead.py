"""Benchmark: training-step time under constraints over the dense step, same model, same stack.

Run from the repository root:

    .venv/bin/python bench/overhead.py [--model smallcnn] [--steps 20] [--rounds 9] [--quick]

Variants (each its own model copy and SGD optimizer, same batch, same seed):
  * dense — forward, backward, SGD step;
  * one per constraint kind, each in its steady state (masks held, ``enforce: fixed``) on every
    conv/linear weight: ``unstructured`` 50×, ``kernel`` 10×, ``pattern`` 4-of-9 + kernel 2×,
    ``balanced`` 50× over 16 × 4 workloads, ``quantize`` 4-bit × 16 codebooks (no pruning);
  * qat-mixture — the heaviest mixture of the quickstart (patterns + kernel pruning, balanced
    64× pruning, 2-bit codes with up to 64 codebooks per layer) in its quantize-stage steady state:
    masks held, quantized forward (STE), gradient masking, re-masking, codebooks refit every 50 steps;
  * progressive-prune — the pruning part with masks recomputed every 50 steps (cubic schedule).
Rounds interleave the variants (dense, qat, progressive, dense, …) so machine noise hits all of
them alike; each round times ``--steps`` steps of each, and the ratio is taken per round and its
median reported. Inputs are a fixed random batch of Fashion-MNIST's shape (step time does not
depend on pixel values). Writes bench/results/overhead.json; ``--quick`` (3 rounds × 5 steps,
about a minute) writes overhead-quick.json and prints it as the last line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.machine import describe, write_result  # noqa: E402
from elastictrain.constraints.plan import resolve  # noqa: E402
from elastictrain.constraints.spec import load, parse  # noqa: E402
from elastictrain.models import build_model  # noqa: E402
from elastictrain.train import Constrainer, EnforceConfig, OptimConfig, build_optimizer  # noqa: E402

SPECS = {"smallcnn": ("configs/specs/smallcnn-mixture.yaml", "configs/specs/smallcnn-prune.yaml")}
TARGET = 1.05
ALL = "*.weight"
BIG = ("features.3.weight", "classifier.0.weight")  # 98% of SmallCNN's weights; 16 × 4 grids divide them
KINDS = {  # inline specs, one constraint kind each (all weights, or the two big layers where a grid must divide)
    "unstructured": {"rules": [{"match": ALL, "prune": {"ratio": 50}}]},
    "kernel": {"rules": [{"match": ALL, "layer": "conv", "prune": {"unit": "kernel", "ratio": 10}}]},
    "pattern": {"rules": [{"match": "features.3.weight", "prune": {"unit": "kernel", "ratio": 2},
                           "pattern": {"entries": 4, "patterns": 8}}]},
    "balanced": {"rules": [{"match": m, "prune": {"ratio": 50}, "balance": {"filter": 16, "channel": 4}} for m in BIG]},
    "quantize": {"rules": [{"match": m, "quantize": {"bits": 4, "groups": {"filter": 16}}} for m in BIG]},
}


def variant(name: str, model_name: str, spec_path: str | None, enforce: EnforceConfig | None, steps_total: int):
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, in_channels=1)
    opt = build_optimizer(model, OptimConfig(lr=0.01))
    c = None
    if spec_path:
        spec = parse(spec_path) if isinstance(spec_path, dict) else load(ROOT / spec_path)
        plans = resolve(spec, {n: tuple(p.shape) for n, p in model.named_parameters()}, str(spec_path)[:40])
        c = Constrainer(dict(model.named_parameters()), plans, enforce, steps_total)
        c.begin(opt)
    return {"name": name, "model": model, "opt": opt, "c": c, "per_step_s": []}


def run_steps(v, x, y, steps: int) -> float:
    model, opt, c = v["model"], v["opt"], v["c"]
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        if c:
            c.before_forward()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if c:
            c.after_backward()
        opt.step()
        if c:
            c.after_step()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smallcnn", choices=sorted(SPECS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=None,
                    help="default bench/results/overhead.json (overhead-quick.json with --quick)")
    ap.add_argument("--quick", action="store_true", help="3 rounds × 5 steps (about a minute); prints the JSON last")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 3, 5
    args.out = args.out or str(ROOT / "bench/results" / ("overhead-quick.json" if args.quick else "overhead.json"))
    mixture, prune = SPECS[args.model]
    total = args.steps * (args.rounds + 1)
    fixed = EnforceConfig(method="fixed", codebook="refit", refit_every=50)
    variants = [
        variant("dense", args.model, None, None, total),
        *[variant(kind, args.model, spec, fixed, total) for kind, spec in KINDS.items()],
        variant("qat-mixture", args.model, mixture, EnforceConfig(method="fixed", codebook="refit", refit_every=50),
                total),
        variant("progressive-prune", args.model, prune,
                EnforceConfig(method="progressive", update_every=50, end=1.0), total),
    ]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    for v in variants:  # warm-up round (allocator, first refit), not counted
        run_steps(v, x, y, args.steps)
    for _ in range(args.rounds):
        for v in variants:
            v["per_step_s"].append(run_steps(v, x, y, args.steps))
    dense = variants[0]["per_step_s"]
    rows = []
    for v in variants:
        ratios = [t / d for t, d in zip(v["per_step_s"], dense)]
        rows.append({"variant": v["name"], "median_step_ms": 1e3 * statistics.median(v["per_step_s"]),
                     "ratio_to_dense_median": statistics.median(ratios), "ratios": ratios,
                     "per_step_s": v["per_step_s"], "stats": v["c"].stats if v["c"] else {}})
    m = describe()
    print(f"### Training-step overhead — {args.model}, batch {args.batch}, {args.rounds} rounds × {args.steps} steps; "
          f"{m['cpu_model']}, {m['logical_cores']} cores, {m['torch_threads']} threads; target ≤ {TARGET}× dense\n")
    print("| variant | median step (ms) | step / dense (median of per-round ratios) |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_step_ms']:.2f} | {r['ratio_to_dense_median']:.3f}× |")
    qat = next(r["ratio_to_dense_median"] for r in rows if r["variant"] == "qat-mixture")
    print(f"\nheaviest mixture (QAT) {qat:.3f}× dense: target {'MET' if qat <= TARGET else 'NOT MET'}")
    result = {"machine": m, "model": args.model, "batch": args.batch, "steps_per_round": args.steps,
              "rounds": args.rounds, "specs": {"qat-mixture": mixture, "progressive-prune": prune, **KINDS},
              "target_ratio": TARGET, "rows": rows}
    write_result(result, args.out)
    if args.quick:
        print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    return result


if __name__ == "__main__":
    main()
