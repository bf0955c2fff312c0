"""`make gpu-check`: the CUDA paths of a run, on a machine with a GPU, against the same run on its CPU.

Runs the quickstart pipeline (shortened: ``--set`` below) four ways — one process on the CPU, one
process with CUDA (``configs/clusters/single.yaml``, device auto), one Ray Train worker with a GPU
over NCCL with bf16 autocast under ZeRO-2 and under ZeRO-3 — then ``eval --device cuda`` of the
CUDA run's final checkpoint, and compares each CUDA run with the CPU one: the final masks (share
of identical bits, per layer), top-1, and that every final checkpoint passes ``verify``. bf16
autocast rounds differently from fp32, so masks are not expected bit-identical; the check asks for
≥ 97% identical mask bits and top-1 within 2 points. Writes ``$OUT/gpu-check.json`` (or
``bench/results/gpu-check.json``); exit 0 when every check held, 1 when one did not, 3 without a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import describe  # noqa: E402
from elastictrain import checkpoint  # noqa: E402

SHORT = ["data.limit_train=12000", "data.limit_test=2000", "stages.*.epochs=1"]
MASK_AGREEMENT, TOP1_POINTS = 0.97, 2.0


def cluster(tmp: Path, name: str, **kw) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **kw}))
    return path


def run(label: str, cluster_path: Path, out: Path, log: list) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "configs/experiments/quickstart.yaml"),
           "--cluster", str(cluster_path), "--out", str(out)] + [a for s in SHORT for a in ("--set", s)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    log.append({"run": label, "rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1),
                "stderr_tail": p.stderr[-2000:]})
    print(f"{label}: exit {p.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
    if p.returncode:
        return {}
    final = out / "finetune" / "checkpoint.pt"
    report = json.loads((out / "finetune" / "report.json").read_text())
    verify = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", str(final), "--spec",
                             str(ROOT / "configs/specs/smallcnn-mixture.yaml")], cwd=ROOT, capture_output=True,
                            text=True)
    return {"top1": report["top1"], "checkpoint": str(final), "verify_ok": verify.returncode == 0,
            "masks": checkpoint.buffers(checkpoint.load(final))["weight_mask"]}


def agreement(a: dict, b: dict) -> dict[str, float]:
    return {n: float((a[n] == b[n]).float().mean()) for n in a}


def main() -> int:
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": describe(), "checks": {}, "log": []}
    if not torch.cuda.is_available():
        result["error"] = "no GPU is visible"
        (out_dir / "gpu-check.json").write_text(json.dumps(result, indent=1))
        print("gpu-check: no GPU is visible; nothing to check")
        return 3
    tmp = out_dir / "gpu-check-runs"
    tmp.mkdir(exist_ok=True)
    gpu_worker = {"kind": "ray", "device": "cuda", "threads": 4,
                  "ray": {"address": "local", "num_workers": 1, "cpus_per_worker": 4, "gpus_per_worker": 1,
                          "storage_path": str(tmp / "ray")}}
    runs = {
        "cpu": cluster(tmp, "cpu", kind="single", device="cpu", threads=8),
        "cuda-single": ROOT / "configs/clusters/single.yaml",
        "ray-nccl-bf16-zero2": cluster(tmp, "zero2", **gpu_worker, deepspeed={"zero_stage": 2}),
        "ray-nccl-bf16-zero3": cluster(tmp, "zero3", **gpu_worker, deepspeed={"zero_stage": 3}),
    }
    got = {label: run(label, path, tmp / label, result["log"]) for label, path in runs.items()}
    cpu = got["cpu"]
    ok = bool(cpu) and cpu["verify_ok"]
    for label, r in got.items():
        if label == "cpu":
            result["checks"][label] = {"ran": bool(r), "top1": r.get("top1"), "verify_ok": r.get("verify_ok")}
            continue
        check = {"ran": bool(r)}
        if r and cpu:
            agree = agreement(cpu["masks"], r["masks"])
            check.update(top1=r["top1"], top1_vs_cpu_points=round(100 * (r["top1"] - cpu["top1"]), 2),
                         mask_bits_identical=agree, verify_ok=r["verify_ok"])
            check["ok"] = (r["verify_ok"] and min(agree.values()) >= MASK_AGREEMENT
                           and abs(r["top1"] - cpu["top1"]) * 100 <= TOP1_POINTS)
        ok = ok and check.get("ok", False)
        result["checks"][label] = check
    if got["cuda-single"]:
        p = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", got["cuda-single"]["checkpoint"],
                            "--data", "fashion-mnist", "--device", "cuda", "--json", str(tmp / "eval.json")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        ev = json.loads((tmp / "eval.json").read_text()) if p.returncode == 0 else {}
        top1 = ev.get("top1", ev.get("accuracy", {}).get("top1") if isinstance(ev.get("accuracy"), dict) else None)
        result["checks"]["eval-cuda"] = {"rc": p.returncode, "top1": top1, "stderr_tail": p.stderr[-1000:]}
        ok = ok and p.returncode == 0
    result["ok"] = ok
    (out_dir / "gpu-check.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "mask_bits_identical"}
                      for k, v in result["checks"].items()}, indent=1))
    print("gpu-check:", "every check held" if ok else "a check failed (see gpu-check.json)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
