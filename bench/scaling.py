"""Benchmark: one process against Ray Train workers on the same cores — where a distributed epoch goes.

Run from the repository root:

    .venv/bin/python bench/scaling.py [--quick]

Runs the quickstart's dense stage (SmallCNN on Fashion-MNIST, global batch 128, 2 epochs; the
second epoch is the one compared, the first pays for warm-up) through ``elastictrain run`` on
each row's cluster, in a fresh run directory:

- ``single``: one process, all cores as torch threads (what ``make demo-single`` runs);
- ``1 worker``: one Ray Train worker with all cores (what Ray and DeepSpeed cost without a peer);
- ``2 workers ZeRO-0, shared memory``: two workers, one core each, adding their gradients in
  ``/dev/shm`` (what ``make demo`` runs: ``configs/clusters/local.yaml``);
- ``2 workers ZeRO-0, gloo``: the same all-reduce through gloo's sockets;
- ``2 workers ZeRO-2, gloo``: DeepSpeed's partitioned gradients (the embedded default until issue 19);
- ``… nice 15``: Ray's default niceness for its workers, below Ray's own processes (the embedded
  cluster starts its workers at nice 0).

For each: the epoch's seconds and images/s from the stage's report, and the ratio to ``single``
(the issue's target: the two-worker epoch ≤ 1.25 × single). Timings on a shared VM drift between
minutes, so every row runs ``--rounds`` times (default 2), the order rotated each round; a row's
ratio is the median over rounds of its epoch against single's epoch *of the same round*. Writes
bench/results/scaling.{json,md} (``--quick``: 3,000 training images, scaling-quick.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PIPELINE = "configs/experiments/quickstart.yaml"


def rows(cores: int) -> dict[str, dict]:
    ray = {"kind": "ray", "device": "cpu", "ray": {"address": "local", "storage_path": "runs/bench-scaling/ray"}}
    half = max(1, cores // 2)
    two = {**ray, "threads": half, "ray": {**ray["ray"], "num_workers": 2, "cpus_per_worker": half}}
    return {
        "single": {"kind": "single", "device": "cpu", "threads": cores},
        "1 worker": {**ray, "threads": cores, "ray": {**ray["ray"], "num_workers": 1, "cpus_per_worker": cores},
                     "deepspeed": {"zero_stage": 0}},
        # the embedded default (configs/clusters/local.yaml): gradients summed in shared memory
        "2 workers ZeRO-0, shared memory": {**two, "deepspeed": {"zero_stage": 0, "shared_memory": True}},
        "2 workers ZeRO-0, gloo": {**two, "deepspeed": {"zero_stage": 0, "shared_memory": False}},
        "2 workers ZeRO-2, gloo": {**two, "deepspeed": {"zero_stage": 2}},
        # Ray's default: workers at nice 15, below Ray's own processes (the embedded cluster sets 0)
        "2 workers ZeRO-0, shared memory, nice 15": {**two, "env": {"RAY_worker_niceness": "15"},
                                                      "deepspeed": {"zero_stage": 0, "shared_memory": True}},
    }


def run_row(label: str, cluster: dict, root: Path, quick: bool) -> dict:
    slug = label.replace(" ", "-").lower()
    run_dir = root / slug
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfile = root / f"{slug}.yaml"
    env = {**os.environ, **cluster.get("env", {})}
    cfile.write_text(yaml.safe_dump({"name": slug, **{k: v for k, v in cluster.items() if k != "env"}}))
    sets = ["stages.dense_pretrain.epochs=2"] + (["data.limit_train=3000", "data.limit_test=500"] if quick else [])
    cmd = [sys.executable, "-m", "pipeline.cli", "run", PIPELINE, "--cluster", str(cfile), "--out", str(run_dir),
           "--stages", "dense_pretrain"] + [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"bench/scaling.py: {label}: exit {p.returncode}: {p.stderr.strip()[-500:]}")
    rep = json.loads((run_dir / "dense_pretrain" / "report.json").read_text())
    last = rep["history"][-1]
    print(f"{label}: epoch {last['seconds']:.1f} s, {last['images_per_s']:.0f} img/s (wall {wall:.0f} s)", flush=True)
    return {"row": label, "cluster": cluster, "world_size": rep["world_size"], "epoch_seconds": last["seconds"],
            "first_epoch_seconds": rep["history"][0]["seconds"], "images_per_s": last["images_per_s"],
            "steps": last["steps"], "top1": rep["top1"], "wall_seconds": wall}


def main(argv=None) -> dict:
    from bench.machine import add_quick, cpu_busy, describe, write_with_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quick(ap, "scaling", "3,000 training images")
    ap.add_argument("--rounds", type=int, default=2, help="each row this many times, the order rotated every round")
    args = ap.parse_args(argv)
    machine = describe()
    cores = machine.get("usable_cores") or 2
    busy = cpu_busy()
    root = ROOT / "runs" / "bench-scaling"
    table = rows(cores)
    labels = list(table)
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    for k in range(args.rounds):  # rotated, so no row always follows the same one
        for label in labels[k % len(labels):] + labels[:k % len(labels)]:
            runs[label].append(run_row(label, table[label], root, args.quick))
    results = []
    for label in labels:  # per round: the row's epoch over single's epoch of the same round
        rs = runs[label]
        ratios = [r["epoch_seconds"] / s["epoch_seconds"] for r, s in zip(rs, runs["single"])]
        results.append({**rs[0], "epoch_seconds": statistics.median(r["epoch_seconds"] for r in rs),
                        "images_per_s": statistics.median(r["images_per_s"] for r in rs),
                        "first_epoch_seconds": statistics.median(r["first_epoch_seconds"] for r in rs),
                        "vs_single": statistics.median(ratios), "rounds": [
                            {k: r[k] for k in ("epoch_seconds", "first_epoch_seconds", "images_per_s", "top1",
                                               "wall_seconds")} for r in rs],
                        "vs_single_per_round": ratios})
    md = "\n".join(["| row | ranks | epoch (s), median | images/s | × single's epoch (median of rounds) | "
                    "× single, each round | first epoch (s) |", "|---|---:|---:|---:|---:|---|---:|"] + [
        f"| {r['row']} | {r['world_size']} | {r['epoch_seconds']:.1f} | {r['images_per_s']:.0f} | "
        f"{r['vs_single']:.2f}× | {' / '.join(f'{x:.2f}' for x in r['vs_single_per_round'])} | "
        f"{r['first_epoch_seconds']:.1f} |" for r in results])
    print("\n" + md)
    result = {"benchmark": "scaling", "quick": args.quick, "machine": machine, "cpu_busy_before": busy,
              "pipeline": PIPELINE, "stage": "dense_pretrain", "rounds": args.rounds,
              "target": "2 workers ≤ 1.25 × single", "rows": results}
    note = (f"# Scaling on one machine ({machine['cpu_model']}, {cores} cores)\n\nThe quickstart's dense stage, "
            f"second epoch (global batch 128); `bench/scaling.py`, {args.rounds} rounds, rows rotated each round. "
            "Target: 2 workers ≤ 1.25 × single.")
    write_with_table(result, args, "scaling", note, md)
    return result


if __name__ == "__main__":
    main()
