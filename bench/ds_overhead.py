"""Benchmark: constraint-layer step overhead on the distributed stack — 2 ranks, each a DeepSpeed
engine over gloo on loopback, exactly as a Ray Train worker builds it (``jobs.deepspeed_engine``;
Ray only launches the processes and is not on the step's path).

Run from the repository root:

    .venv/bin/python bench/ds_overhead.py [--steps 15] [--rounds 7]

Variants per rank, interleaved round by round (SmallCNN, global batch 128 = 2 × 64):
dense ZeRO-2; QAT mixture ZeRO-2 (``smallcnn-mixture.yaml``: masks held, quantized forward, grad
hooks, rank check on refits every 50 steps); dense ZeRO-0; QAT mixture ZeRO-0 with sparse-aware
reduction; dense ZeRO-3; QAT ZeRO-3 mixture (``smallcnn-zero3-mixture.yaml``: weights sharded, the
quantized forward written into each rank's slices, codebooks refit by distributed k-means). Ratios
are per round against the dense run of the same ZeRO stage; medians reported.
Writes bench/results/ds_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SPEC = "configs/specs/smallcnn-mixture.yaml"
SPEC_ZERO3 = "configs/specs/smallcnn-zero3-mixture.yaml"  # the same without patterns: projects on slices
VARIANTS = [("dense", 2, False, False), ("qat-mixture", 2, True, False),
            ("dense", 0, False, False), ("qat-mixture+sparse-reduce", 0, True, True),
            ("dense", 3, False, False), ("qat-zero3-mixture", 3, True, False)]


def worker(rank: int, port: int, steps: int, rounds: int, out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    import deepspeed

    from elastictrain.constraints.plan import resolve
    from elastictrain.constraints.spec import load
    from elastictrain.models import build_model
    from elastictrain.train import Constrainer, EnforceConfig, LRConfig, OptimConfig, build_optimizer, build_scheduler
    from jobs.backend import DeepSpeedBackend
    from jobs.cluster import DeepSpeedConfig

    deepspeed.init_distributed(dist_backend="gloo")
    runs = []
    for name, zero, constrained, sparse in VARIANTS:
        torch.manual_seed(0)
        model = build_model("smallcnn", num_classes=10, in_channels=1)
        opt = build_optimizer(model, OptimConfig(lr=0.01))
        sched = build_scheduler(opt, LRConfig(name="constant"), 100, 100)
        c = None
        if constrained:
            spec = SPEC_ZERO3 if zero == 3 else SPEC
            plans = resolve(load(ROOT / spec), {n: tuple(p.shape) for n, p in model.named_parameters()})
            c = Constrainer(dict(model.named_parameters()), plans, EnforceConfig(method="fixed", refit_every=50), 10**6)
        backend = DeepSpeedBackend(DeepSpeedConfig(zero_stage=zero, sparse_reduce=sparse), rank, 2, torch.device("cpu"))
        engine, stepper = backend.engine(model, opt, sched, c, batch_per_rank=64, clip=None)
        if c is not None:
            for event in c.begin(opt):
                backend.after_update(c, event)
        runs.append({"name": name, "zero": zero, "engine": engine, "stepper": stepper, "c": c, "backend": backend,
                     "t": []})
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)

    def run(v, n):
        t0 = time.perf_counter()
        for _ in range(n):
            if v["c"]:
                v["c"].before_forward()
            loss = torch.nn.functional.cross_entropy(v["engine"](x), y)
            v["stepper"].backward(loss)
            if v["c"]:
                v["c"].after_backward()
            v["stepper"].step()
            if v["c"]:
                for event in v["c"].after_step():  # re-mask DeepSpeed's partitions, check ranks
                    v["backend"].after_update(v["c"], event)
        return (time.perf_counter() - t0) / n

    for v in runs:
        run(v, 3)  # warm-up
    for _ in range(rounds):
        for v in runs:
            torch.distributed.barrier()
            v["t"].append(run(v, steps))
    if rank == 0:
        rows = []
        for v in runs:
            dense = next(d for d in runs if d["name"] == "dense" and d["zero"] == v["zero"])
            ratios = [a / b for a, b in zip(v["t"], dense["t"])]
            rows.append({"variant": v["name"], "zero_stage": v["zero"],
                         "median_step_ms": 1e3 * statistics.median(v["t"]),
                         "ratio_to_dense_median": statistics.median(ratios), "per_step_s": v["t"]})
        Path(out).write_text(json.dumps(rows))


def main(argv=None) -> dict:
    from bench.machine import add_quick

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=7)
    add_quick(ap, "ds_overhead", "2 rounds × 5 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 5
    from bench.machine import describe, finish, out_path, spawn_two

    rows = spawn_two(worker, args.steps, args.rounds, out=out_path(args, "ds_overhead"))

    m = describe()
    print("### Step overhead on the distributed stack — SmallCNN, 2 ranks × DeepSpeed (gloo, loopback), "
          "global batch 128; "
          f"{m['cpu_model']}, {m['logical_cores']} cores, 1 thread per rank; target ≤ 1.05× dense\n")
    print("| variant | ZeRO | median step (ms) | step / dense, same ZeRO (median of rounds) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['zero_stage']} | {r['median_step_ms']:.2f} | {r['ratio_to_dense_median']:.3f}× |")
    result = {"machine": m, "model": "smallcnn", "spec": SPEC, "spec_zero3": SPEC_ZERO3, "world_size": 2,
              "steps_per_round": args.steps,
              "rounds": args.rounds, "rows": rows}
    return finish(result, args, "ds_overhead")


if __name__ == "__main__":
    main()
