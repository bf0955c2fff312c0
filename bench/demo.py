"""Benchmark: the quickstart demo (`make demo`, `make demo-single`) timed and scored on both clusters.

Run from the repository root:

    .venv/bin/python bench/demo.py [--clusters local,single] [--quick]

For each cluster config (``configs/clusters/local.yaml``: in-process Ray, 2 workers, each a
DeepSpeed engine — what ``make demo`` runs; ``configs/clusters/single.yaml``: one process, no Ray —
``make demo-single``) this runs the command those targets run,

    elastictrain run configs/experiments/quickstart.yaml --cluster configs/clusters/<c>.yaml \\
        --out runs/bench-demo/<c>

in a fresh run directory (removed first, so no stage is skipped), times it (Ray start-up
included) and reads every stage's ``report.json``: epochs, seconds, seconds per training epoch
(median of the stage's per-epoch history), top-1; and of the final stage the pruning ratio, bits,
nominal ratio, stored-bits ratio and honest ratio of the packed ``model.etz``. It also keeps what
the command printed and counts it: lines per stage, epoch lines printed more than once, and lines
of other libraries or of Ray (warnings, worker prefixes, tracebacks) on the console, beside the
files under ``RUN_DIR/logs/`` where those went instead. Prints a table and
writes bench/results/demo.json and demo.md (demo-<cluster>.json/.md when ``--clusters`` names only
some, so a partial run never replaces the full one); ``--quick`` (1 epoch a stage on 3,000 training
and 1,000 test images) writes the same name with ``-quick`` appended, JSON only, never the full
results, and prints it as the last line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PIPELINE = "configs/experiments/quickstart.yaml"
CLUSTERS = {"local": "make demo", "single": "make demo-single"}
QUICK = ["stages.*.epochs=1", "data.limit_train=3000", "data.limit_test=1000"]


def command() -> list[str]:
    """The ``elastictrain`` console script beside this interpreter (what ``make demo`` calls), or
    the same entry point through ``-m``."""
    script = Path(sys.executable).parent / "elastictrain"
    return [_rel(script)] if script.is_file() else [sys.executable, "-m", "pipeline.cli"]


def _rel(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside it (for the JSON)."""
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return str(path)


def run_cluster(cluster: str, run_dir: Path, quick: bool) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [*command(), "run", PIPELINE, "--cluster", f"configs/clusters/{cluster}.yaml", "--out", _rel(run_dir)]
    for s in QUICK if quick else []:
        cmd += ["--set", s]
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench/demo.py: the {cluster} run exited {proc.returncode}; nothing written")
    stages = []
    for name in _stage_names(run_dir):
        rep = json.loads((run_dir / name / "report.json").read_text())
        epoch_s = [h["seconds"] for h in rep.get("history", []) if "seconds" in h]
        stages.append({"stage": name, "kind": rep.get("kind"), "epochs": rep["epochs"], "seconds": rep["seconds"],
                       "epoch_seconds_median": statistics.median(epoch_s) if epoch_s else None,
                       "top1": rep["top1"], "top5": rep["top5"], "world_size": rep["world_size"],
                       "pruning_ratio": rep["pruning_ratio"], "nominal_compression": rep["nominal_compression"],
                       "storage_compression": rep["storage_compression"],
                       "honest_compression": rep.get("honest_compression"),
                       "bits": sorted({layer["bits"] for layer in rep["layers"] if layer["bits"] != 32})})
    first, last = stages[0], stages[-1]
    return {"cluster": cluster, "config": f"configs/clusters/{cluster}.yaml", "make_target": CLUSTERS[cluster],
            "command": " ".join(cmd), "run_dir": _rel(run_dir), "wall_seconds": wall,
            "stage_seconds_total": sum(s["seconds"] for s in stages),
            "epochs_total": sum(s["epochs"] for s in stages), "world_size": last["world_size"],
            "dense_top1": first["top1"], "final_top1": last["top1"], "final_stage": last["stage"],
            "pruning_ratio": last["pruning_ratio"], "bits": last["bits"],
            "nominal_compression": last["nominal_compression"], "storage_compression": last["storage_compression"],
            "honest_compression": last["honest_compression"], "stages": stages,
            "console": console(proc.stdout, [s["stage"] for s in stages], run_dir)}


# what only other libraries and Ray print (our own lines never contain these)
THIRD_PARTY = ("Warning", "WARNING", "RayTrainWorker", "TrainController", "Traceback", "deepspeed", " INFO ",
               "core_worker", "PreemptionWatcher")


def console(text: str, stages: list[str], run_dir: Path) -> dict:
    """What the run printed, counted: lines per stage, duplicated stage lines, third-party lines."""
    lines = [line for line in text.splitlines() if line.strip()]
    per_stage = {s: [line for line in lines if line.startswith(f"[{s}]")] for s in stages}
    dup = sorted({line for s in per_stage.values() for line in s if s.count(line) > 1})
    logs = run_dir / "logs"
    files = sorted(logs.rglob("*")) if logs.is_dir() else []
    return {"lines": len(lines), "lines_per_stage": {s: len(v) for s, v in per_stage.items()},
            "duplicated_lines": dup, "third_party_lines": [x for x in lines if any(m in x for m in THIRD_PARTY)],
            "log_files": {str(p.relative_to(run_dir)): p.stat().st_size for p in files if p.is_file()}, "text": text}


def _stage_names(run_dir: Path) -> list[str]:
    """The pipeline's stages in order, from the snapshot the run kept (``RUN_DIR/pipeline.yaml``)."""
    import yaml

    return [s["name"] for s in yaml.safe_load((run_dir / "pipeline.yaml").read_text())["stages"]]


def markdown(results: list[dict], machine: dict, quick: bool) -> str:
    def ratio(x):
        return f"{x:,.0f}×" if x is not None and x >= 100 else f"{x:.1f}×" if x is not None else "—"

    names = [s["stage"] for s in results[0]["stages"]] if results else []
    lines = [f"quickstart demo ({PIPELINE}){' — QUICK run, not the benchmark' if quick else ''}; "
             f"{machine['cpu_model']}, {machine['logical_cores']} cores, GPU: {machine['gpu'] or 'none'}", "",
             "| target | cluster | ranks | wall (s) | s / training epoch (" + ", ".join(names) + ") | dense top-1 "
             "| final top-1 | pruning | bits | nominal | stored bits | honest (model.etz) |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        per_epoch = " / ".join(f"{s['epoch_seconds_median']:.1f}" if s["epoch_seconds_median"] is not None else "—"
                               for s in r["stages"])
        bits = ", ".join(map(str, r["bits"])) or "32 (fp32)"
        lines.append(f"| `{r['make_target']}` | {r['cluster']} | {r['world_size']} | {r['wall_seconds']:.0f} "
                     f"| {per_epoch} | {r['dense_top1']:.2%} | {r['final_top1']:.2%} | {r['pruning_ratio']:.1f}× "
                     f"| {bits} | {ratio(r['nominal_compression'])} | {ratio(r['storage_compression'])} "
                     f"| {ratio(r['honest_compression'])} |")
    lines += ["", "| target | console lines (per stage) | epoch lines printed twice | third-party lines | "
              "RUN_DIR/logs files (bytes) |", "|---|---|---:|---:|---:|"]
    for r in results:
        c = r["console"]
        lines.append(f"| `{r['make_target']}` | {c['lines']} ({' / '.join(map(str, c['lines_per_stage'].values()))}) "
                     f"| {len(c['duplicated_lines'])} | {len(c['third_party_lines'])} "
                     f"| {len(c['log_files'])} ({sum(c['log_files'].values()):,}) |")
    lines += ["", "- wall: the whole `elastictrain run` command (Ray start-up included); s / training epoch: the "
              "median epoch of each stage's history (training only; evaluation and export come on top).",
              "- pruning: parameters / non-zeros of the conv and linear weights; nominal: 32·params / Σ "
              "non-zeros·bits; stored bits: the accounting's cheapest encoding; honest: 32·params / "
              "(8 · weight bytes of model.etz)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from bench.machine import add_quick, cpu_busy, describe, finish, out_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clusters", default="local,single", help="comma-separated, of: " + ", ".join(CLUSTERS))
    add_quick(ap, "demo", "1 epoch a stage, 3,000 training and 1,000 test images")
    args = ap.parse_args(argv)
    clusters = [c.strip() for c in args.clusters.split(",") if c.strip()]
    unknown = [c for c in clusters if c not in CLUSTERS]
    if unknown:
        ap.error(f"--clusters: unknown {', '.join(unknown)} (clusters: {', '.join(CLUSTERS)})")
    busy = cpu_busy()
    if busy is not None and busy > 0.10:
        print(f"WARNING: the cores are already {busy:.0%} busy with other processes; timings will be inflated",
              flush=True)
    name = "demo" if set(clusters) == set(CLUSTERS) else "demo-" + "-".join(clusters)
    results = [run_cluster(c, ROOT / "runs" / "bench-demo" / (c + ("-quick" if args.quick else "")), args.quick)
               for c in clusters]
    machine = describe()
    md = markdown(results, machine, args.quick)
    print("\n" + md)
    result = {"benchmark": "demo", "quick": args.quick, "machine": machine, "cpu_busy_before": busy,
              "pipeline": PIPELINE, "overrides": QUICK if args.quick else [], "rows": results}
    if not args.quick:
        md_path = Path(out_path(args, name)).with_suffix(".md")
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text("# Quickstart demo\n\n" + md)
    return finish(result, args, name)


if __name__ == "__main__":
    main()
