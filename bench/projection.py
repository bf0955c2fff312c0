"""Benchmark: the vectorised composed projection vs a per-block Python loop, on VGG16.

Run from the repository root:

    .venv/bin/python bench/projection.py [--repeats 5] [--loop-layers N]

It builds VGG16 (seed 0), projects all its conv/linear weights (~14.7M) onto
configs/specs/vgg16-mixture.yaml (patterns → balanced kernel pruning → 2-bit multi-codebook
k-means) and times:
  * ``elastictrain.project.project(weights, plans)`` — library fit + projection (one warm-up,
    then the median of ``--repeats``);
  * the same with the pattern libraries fixed (``libraries=`` from the first run), the per-update
    cost during training, where libraries are fitted once per stage;
  * ``bench/loop_reference.py`` — the same semantics with Python loops over kernels, workloads and
    codebook groups, timed once (over all layers, or over the first N and extrapolated by
    parameter count with ``--loop-layers N``).
Both results are checked with ``elastictrain.constraints.verify.verify`` and compared element by element. A
per-stage breakdown (``bench/breakdown.py``: the real ``project()`` under torch's profiler, summed
by the library's own stage labels) shows where the time goes. Tables go to stdout, everything to
bench/results/projection.json (projection-quick.json with ``--quick``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.breakdown import breakdown, print_table  # noqa: E402
from bench.loop_reference import loop_project  # noqa: E402
from bench.machine import add_quick, cpu_busy, describe, finish  # noqa: E402
from elastictrain.constraints.plan import resolve  # noqa: E402
from elastictrain.constraints.projection import project  # noqa: E402
from elastictrain.constraints.spec import load  # noqa: E402
from elastictrain.constraints.verify import verify  # noqa: E402
from elastictrain.models import build_model  # noqa: E402

SPEC = "configs/specs/vgg16-mixture.yaml"
TARGET_S, TARGET_SPEEDUP = 0.5, 100.0


def timed(fn, repeats: int) -> dict:
    t0 = time.perf_counter()
    result = fn()
    warm = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return {"warmup_s": warm, "runs_s": runs, "median_s": statistics.median(runs), "result": result}


def compare(vec_out, vec_states, loop) -> dict:
    """Element-wise agreement of the loop reference with the vectorised result, per layer."""
    per, tot = {}, {"elements": 0, "kept": 0, "mask_equal": 0, "weight_equal": 0}
    for n, lw in loop.weights.items():
        vm, lm = vec_states[n].mask, loop.masks[n]
        row = {
            "elements": lm.numel(),
            "kept": int(vm.sum()),
            "mask_equal": int((vm == lm).sum()),
            "mask_identical": bool(torch.equal(vm, lm)),
            "weight_equal": int((vec_out[n] == lw).sum()),
            "max_abs_diff": float((vec_out[n] - lw).abs().max()),
        }
        if n in loop.libraries:
            row["library_identical"] = bool(torch.equal(vec_states[n].library, loop.libraries[n]))
        per[n] = row
        for k in tot:
            tot[k] += row[k]
    tot["mask_equal_fraction"] = tot["mask_equal"] / tot["elements"]
    tot["weights_differing"] = tot["elements"] - tot["weight_equal"]
    tot["weight_equal_fraction"] = tot["weight_equal"] / tot["elements"]
    tot["differing_fraction_of_kept"] = tot["weights_differing"] / max(tot["kept"], 1)
    tot["layers_mask_identical"] = sum(r["mask_identical"] for r in per.values())
    tot["layers"] = len(per)
    tot["max_abs_diff"] = max(r["max_abs_diff"] for r in per.values())
    return {"total": tot, "per_layer": per}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up (median reported)")
    ap.add_argument("--loop-layers", type=int, default=None,
                    help="run the loop reference on the first N constrained layers only and extrapolate by "
                         "parameter count (rough: the first layers are small, so per-block overheads weigh more)")
    add_quick(ap, "projection", "one timed repeat, the loop reference on 2 layers (extrapolated)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.loop_layers = 1, 2

    busy_before = cpu_busy()
    if busy_before is not None and busy_before > 0.10:
        print(f"WARNING: the cores are already {busy_before:.0%} busy with other processes; timings will be inflated",
              flush=True)
    torch.manual_seed(0)
    model = build_model("vgg16", num_classes=10, in_channels=3)
    weights = {n: p.detach() for n, p in model.named_parameters() if p.dim() in (2, 4)}
    plans = resolve(load(ROOT / SPEC), {n: tuple(w.shape) for n, w in weights.items()}, SPEC)
    n_weights = sum(w.numel() for w in weights.values())
    n_planned = sum(p.params for p in plans.values())

    full = timed(lambda: project(weights, plans), args.repeats)
    vec_out, vec_states = full.pop("result")
    libs = {n: s.library for n, s in vec_states.items() if s.library is not None}
    fixed = timed(lambda: project(weights, plans, libraries=libs), args.repeats)
    fixed_out, _ = fixed.pop("result")

    names = list(plans)[:args.loop_layers]
    loop_plans = {n: plans[n] for n in names}
    loop_params = sum(p.params for p in loop_plans.values())
    print(f"loop reference over {len(names)}/{len(plans)} layers ({loop_params:,} weights) ...", flush=True)
    t0 = time.perf_counter()
    loop = loop_project(weights, plans, args.loop_layers)
    loop_s = time.perf_counter() - t0
    extrapolated = len(names) < len(plans)
    loop_full_s = loop_s * n_planned / loop_params

    checks = {
        "vectorised": [str(v) for v in verify(plans, vec_out, libs)],
        "vectorised_fixed_libraries": [str(v) for v in verify(plans, fixed_out, libs)],
        "loop": [str(v) for v in verify(loop_plans, loop.weights, loop.libraries)],
        "fixed_equals_full": all(torch.equal(fixed_out[n], vec_out[n]) for n in plans),
    }
    agree = compare(vec_out, vec_states, loop)
    bd = {"full": breakdown(weights, plans, args.repeats),
          "fixed_libraries": breakdown(weights, plans, args.repeats, libs)}

    speed_full, speed_fixed = loop_full_s / full["median_s"], loop_full_s / fixed["median_s"]
    met_time, met_speed = full["median_s"] <= TARGET_S, speed_full >= TARGET_SPEEDUP
    m = describe()
    m["cpu_busy_before_run"], m["cpu_busy_after_run"] = busy_before, cpu_busy()
    how = "extrapolated from %d layers" % len(names) if extrapolated else "measured, all layers"
    print(f"\n### Composed projection, VGG16 × {SPEC} — {m['cpu_model']}, {m['logical_cores']} cores, "
          f"{m['torch_threads']} torch threads; other load before/after run: "
          f"{m['cpu_busy_before_run']:.0%}/{m['cpu_busy_after_run']:.0%} busy")
    print(f"Target: full mixture ≤ {TARGET_S} s and ≥ {TARGET_SPEEDUP:.0f}× faster than the loop — "
          f"time {'MET' if met_time else 'NOT MET'}, speed-up {'MET' if met_speed else 'NOT MET'}\n")
    print("| variant | seconds | weights | loop / this |")
    print("|---|---:|---:|---:|")
    print(f"| vectorised full mixture (fit libraries + project), median of {args.repeats} "
          f"| {full['median_s']:.3f} | {n_planned:,} | {speed_full:.0f}× |")
    print(f"| vectorised, fixed libraries, median of {args.repeats} "
          f"| {fixed['median_s']:.3f} | {n_planned:,} | {speed_fixed:.0f}× |")
    loop_cell = f"{loop_full_s:.1f}" + ("" if not extrapolated else f" (measured {loop_s:.1f} s on {loop_params:,})")
    print(f"| per-block loop, 1 run ({how}) | {loop_cell} | {n_planned:,} | 1× |")
    print(f"\nwarm-up (first call): full {full['warmup_s']:.3f} s, fixed {fixed['warmup_s']:.3f} s; "
          f"runs full {[round(t, 3) for t in full['runs_s']]}, fixed {[round(t, 3) for t in fixed['runs_s']]}")
    t = agree["total"]
    print(f"verify: vectorised {len(checks['vectorised'])} violations, fixed-library "
          f"{len(checks['vectorised_fixed_libraries'])}, loop {len(checks['loop'])}; "
          f"fixed-library output == full output: {checks['fixed_equals_full']}")
    print(f"loop vs vectorised over {t['elements']:,} weights: masks equal {t['mask_equal_fraction']:.6%} "
          f"({t['layers_mask_identical']}/{t['layers']} layers identical), weights differing "
          f"{t['weights_differing']:,} ({1 - t['weight_equal_fraction']:.4%} of all, "
          f"{t['differing_fraction_of_kept']:.2%} of the {t['kept']:,} kept), max |diff| {t['max_abs_diff']:.3g}")

    for key, title in [("full", "full mixture"), ("fixed_libraries", "fixed libraries")]:
        print(f"\n### Where the time goes — {title} (median of {args.repeats} profiled runs of project())\n")
        print_table(bd[key])

    result = {
        "machine": m, "spec": SPEC, "model": "vgg16", "seed": 0,
        "weights_total": n_weights, "weights_constrained": n_planned, "layers": len(plans),
        "repeats": args.repeats,
        "timings": {
            "vectorised_full": full, "vectorised_fixed_libraries": fixed,
            "loop": {"measured_s": loop_s, "layers": names, "weights_measured": loop_params,
                     "extrapolated": extrapolated, "full_model_s": loop_full_s,
                     "how": how},
        },
        "ratio_loop_over_vectorised_full": speed_full,
        "ratio_loop_over_vectorised_fixed": speed_fixed,
        "target": {"full_mixture_max_s": TARGET_S, "min_speedup": TARGET_SPEEDUP,
                   "time_met": met_time, "speedup_met": met_speed},
        "verify": checks, "loop_vs_vectorised": agree, "breakdown": bd,
    }
    return finish(result, args, "projection")


if __name__ == "__main__":
    main()
