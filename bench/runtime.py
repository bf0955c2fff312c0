"""Benchmark: what the runtime for constrained layers (``elastictrain.runtime``) buys at inference —
per row of the research release's VGG16 table and the quickstart's model, latency of dense vs the
deployed model (``deploy.shrink`` + BatchNorm folded: pruned filters / channels gone, the rest
dense) vs the runtime (each layer's fastest exact implementation, autotuned on this machine).

Run from the repository root:

    .venv/bin/python bench/runtime.py [--rows 100x-kernel,...] [--batch 64] [--warmup 3] [--runs 20] [--quick]

Models: VGG16 (3×32×32) and SmallCNN (1×28×28) from ``build_model``, initialised from ``--seed``
with random BatchNorm affines and running statistics measured on random images (bench/deploy.py's
``make_dense``), then compressed one-shot by the row's spec (``compress_state_dict``: the spec's
masks and codes, exactly what a training stage's verify accepts). Latency does not depend on how
the surviving weights were trained, only on where they are; global magnitude scopes on an
untrained model put the survivors where a random initialisation's magnitudes do, so each row
records its per-layer densities.

Latency: median ms of ``--runs`` calls after ``--warmup``, batch 1 and ``--batch``, 2 threads,
eval mode under ``torch.inference_mode``, the variants of a row timed interleaved in blocks (as in
bench/deploy.py). The runtime is tuned separately for each batch size (``autotune`` on a random
batch of that size; the tuning seconds are recorded). Exactness: max |Δ logits| of the deployed
and runtime models vs the masked model on ``--batch`` images, and whether top-1 agrees on all.
MAC reduction: dense MACs ÷ the MACs of non-zero weights (the ideal); realized ÷ ideal = speedup ÷
MAC reduction.

Writes bench/results/runtime.json (machine, settings, every figure, each layer's choice and
timings) and runtime.md; ``--quick`` (batch 8, 3 + 5 runs, two rows) writes runtime-quick.json.
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
import yaml  # noqa: E402
from torch import nn  # noqa: E402

THREADS = 2
BLOCK = 5
TOLERANCE = 1e-4
SPECS = ROOT / "configs" / "specs"
ROWS = {  # row -> (model, spec file)
    "50x-unstructured": ("vgg16", "vgg16-50x-unstructured.yaml"),
    "1000x-unstructured": ("vgg16", "vgg16-1000x-unstructured.yaml"),
    "100x-kernel": ("vgg16", "vgg16-100x-kernel.yaml"),
    "500x-kernel": ("vgg16", "vgg16-500x-kernel.yaml"),
    "pattern-kernel": ("vgg16", "vgg16-pattern.yaml"),
    "balanced-16x4": ("vgg16", "vgg16-balanced.yaml"),
    "16000x-mixture": ("vgg16", "vgg16-16000x-1000x-2bit-64cb.yaml"),
    "quickstart-mixture": ("smallcnn", "smallcnn-mixture.yaml"),
}


def masked_model(model_name: str, spec_file: str, seed: int, etz_dir: Path | None = None) -> tuple[nn.Module, dict]:
    """The zoo model compressed one-shot by the spec (weights replaced by the projected ones) and
    the density of each planned weight; with ``etz_dir``, also the ``.etz`` export's size report."""
    from bench.deploy import calibrate, make_dense
    from elastictrain.compress import compress_state_dict
    from elastictrain.constraints.spec import parse

    model = make_dense(model_name, seed)
    spec = parse(yaml.safe_load((SPECS / spec_file).read_text()), spec_file)
    result = compress_state_dict(dict(model.state_dict()), spec, spec_file)
    assert result.violations == [], result.violations
    packed = None
    if etz_dir is not None:
        from elastictrain import artifact

        packed = artifact.export(result.checkpoint(spec=yaml.safe_load((SPECS / spec_file).read_text())),
                                 etz_dir / f"{Path(spec_file).stem}.etz")
    model.load_state_dict(result.state_dict)
    model = calibrate(model, model_name, seed)  # BN statistics of the compressed network
    density = {n: float((p != 0).float().mean()) for n, p in model.named_parameters() if n in result.plans}
    return model.eval(), {"density": density, "etz": packed}


def macs_of(model: nn.Module, shape, nonzero: bool) -> int:
    """MACs per image of the conv / linear layers (of their non-zero weights when ``nonzero``)."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        w = m.weight.detach()
        per_out = int((w != 0).sum()) if nonzero else w.numel()
        total += per_out * (out[0, 0].numel() if out.dim() == 4 else 1)

    hs = [m.register_forward_hook(hook) for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    with torch.inference_mode():
        model(torch.zeros(1, *shape))
    for h in hs:
        h.remove()
    return total


def weight_memory(dense: nn.Module, runtime: nn.Module, etz: dict) -> dict:
    """Bytes the conv / linear layers hold for their weights (and biases) in the dense model and in
    the runtime (CSR structure + fp32 values or codes + table, BN scale), beside the .etz bytes."""
    from elastictrain.runtime.layers import CSRConv2d, CSRLinear, GatherConv2d

    def held(m: nn.Module) -> int:
        if isinstance(m, (CSRConv2d, CSRLinear, GatherConv2d)):
            return sum(t.numel() * t.element_size() for t in m.buffers())
        if type(m) in (nn.Conv2d, nn.Linear):
            return sum(t.numel() * t.element_size() for t in m.parameters())
        return 0

    d, r = sum(held(m) for m in dense.modules()), sum(held(m) for m in runtime.modules())
    return {"dense_bytes": d, "runtime_bytes": r, "etz_weight_bytes": etz["weights_bytes"],
            "etz_bytes": etz["bytes"], "runtime_over_etz_weights": r / etz["weights_bytes"]}


def timed(calls: dict, x: torch.Tensor, warmup: int, runs: int) -> dict[str, float]:
    from bench.machine import interleaved_ms

    with torch.inference_mode():
        return interleaved_ms(calls, x, warmup, runs, BLOCK)


def bench_row(row: str, a) -> dict:
    import copy

    from bench.deploy import SHAPES, make_dense
    from elastictrain.deploy import shrink
    from elastictrain.deploy.export import fold_batchnorm
    from elastictrain.runtime import apply, autotune
    from elastictrain.runtime.layers import is_plain_2x2_pool

    model_name, spec_file = ROWS[row]
    shape = SHAPES[model_name]
    dense = make_dense(model_name, a.seed)
    masked, info = masked_model(model_name, spec_file, a.seed, a.tmp)
    density = info["density"]
    pools = {n: "strided" for n, m in dense.named_modules() if is_plain_2x2_pool(m)}
    dense_pool = apply(copy.deepcopy(dense), pools)  # the stock model with only the runtime's pools
    x = torch.randn(a.batch, *shape, generator=torch.Generator().manual_seed(a.seed + 3))
    with torch.inference_mode():
        reference = masked(x)
    small, report = shrink(masked, x[:1])
    deployed = fold_batchnorm(small).eval()
    out = {"row": row, "model": model_name, "spec": spec_file, "density": density,
           "macs_dense": macs_of(dense, shape, False), "macs_nonzero": macs_of(masked, shape, True),
           "macs_deployed": macs_of(deployed, shape, False), "latency_ms": {}, "tuning": {}, "tune_seconds": {}}
    out["mac_reduction"] = out["macs_dense"] / out["macs_nonzero"]
    for b in (1, a.batch):
        xb = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b))
        t0 = time.perf_counter()
        tuning = autotune(deployed, xb, warmup=a.warmup, runs=max(5, a.runs // 2))
        out["tune_seconds"][f"b{b}"] = time.perf_counter() - t0
        runtime = apply(copy.deepcopy(deployed), tuning.choices())
        out["tuning"][f"b{b}"] = tuning.to_dict()
        out["latency_ms"][f"b{b}"] = timed({"dense": dense, "dense+pools": dense_pool, "deployed": deployed,
                                            "runtime": runtime}, xb, a.warmup, a.runs)
        if b == a.batch:
            out["memory"] = weight_memory(dense, runtime, info["etz"])
        if b == a.batch:
            with torch.inference_mode():
                got = {"deployed": deployed(x), "runtime": runtime(x)}
            out["max_abs_diff"] = {k: float((v - reference).abs().max()) for k, v in got.items()}
            out["top1_identical"] = {k: bool(torch.equal(v.argmax(1), reference.argmax(1))) for k, v in got.items()}
    lat = out["latency_ms"][f"b{a.batch}"]
    out["speedup"] = {key: {k: ms["dense"] / v for k, v in ms.items()} for key, ms in out["latency_ms"].items()}
    out["realized_over_ideal"] = lat["dense"] / lat["runtime"] / out["mac_reduction"]
    print(f"  {row}: {json.dumps({k: round(v, 2) for k, v in lat.items()})} ms at b{a.batch}", flush=True)
    return out


# ---- workload balance: a balanced layer's threads get equal work, an unbalanced one's do not

BALANCE_LAYER = ("features.10", 128, 128, 16)  # VGG16's second 128→128 conv, at 16×16
BALANCE_RATIO = 20


def balance_weights(seed: int) -> dict[str, torch.Tensor]:
    """One conv weight pruned BALANCE_RATIO× two ways from the same values: workload-balanced
    ({filter: 16, channel: 4}: equal non-zeros per tile) and unstructured (per layer). The values
    are Kaiming-normal with each filter scaled by a log-normal factor (σ 0.5), as trained filters'
    norms spread; plain magnitude pruning then leaves filters with very different non-zero counts."""
    from elastictrain.compress import compress_state_dict
    from elastictrain.constraints.spec import parse

    _, cin, cout, _ = BALANCE_LAYER
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (cin * 9)) ** 0.5
    w *= torch.exp(0.5 * torch.randn(cout, 1, 1, 1, generator=g))
    out = {}
    for kind, rule in (("balanced", {"prune": {"ratio": BALANCE_RATIO}, "balance": {"filter": 16, "channel": 4}}),
                       ("unbalanced", {"prune": {"ratio": BALANCE_RATIO}})):
        spec = parse({"rules": [{"match": "w", "layer": "conv", **rule}]}, kind)
        out[kind] = compress_state_dict({"w": w.clone()}, spec, kind).state_dict["w"]
    return out


def thread_scaling(a) -> dict:
    """Wall time, per-thread work / time and the kernel's own speedup (1-thread time over the slowest
    of 2 threads: the wall time adds the serial padding of the input) of the CSR conv, each weight split
    by filter count (a static schedule: the spec's workloads decide the balance) and, for the
    unbalanced one, also by non-zeros (what the runtime does by default)."""
    from elastictrain.runtime.layers import CSRConv2d
    from elastictrain.runtime.ops import split_rows

    name, cin, cout, side = BALANCE_LAYER
    x = torch.randn(a.batch, cin, side, side, generator=torch.Generator().manual_seed(7))
    result = {"layer": name, "shape": [cout, cin, 3, 3], "input": list(x.shape), "ratio": BALANCE_RATIO, "rows": []}
    for kind, w in balance_weights(a.seed).items():
        conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(w)
        m = CSRConv2d(conv)
        per_filter = (m.crow[1:] - m.crow[:-1]).tolist()
        for split in (("rows",) if kind == "balanced" else ("rows", "work")):
            row = {"weight": kind, "split": split, "nonzeros": int(m.val.numel()),
                   "filter_nonzeros_min_max": [min(per_filter), max(per_filter)]}
            for t in (1, 2):
                walls, threads = [], []
                with torch.inference_mode():
                    for i in range(a.warmup + a.runs):
                        t0 = time.perf_counter()
                        _, secs = m.timed(x, split, t)
                        if i >= a.warmup:
                            walls.append(time.perf_counter() - t0)
                            threads.append(secs)
                bounds = split_rows(m.crow, t, split)
                work = (m.crow[bounds[1:]] - m.crow[bounds[:-1]]).tolist()
                per_thread = torch.stack(threads).median(0).values.tolist()
                row[f"t{t}"] = {"wall_ms": 1000 * statistics.median(walls), "work_per_thread": work,
                                "thread_ms": [1000 * v for v in per_thread]}
            row["speedup_2_over_1"] = row["t1"]["wall_ms"] / row["t2"]["wall_ms"]
            # the kernel's parallel region alone (wall time adds the serial padding and allocation)
            row["kernel_speedup_2_over_1"] = row["t1"]["thread_ms"][0] / max(row["t2"]["thread_ms"])
            row["thread_ms_min_over_max"] = min(row["t2"]["thread_ms"]) / max(row["t2"]["thread_ms"])
            w2 = row["t2"]["work_per_thread"]
            row["work_max_over_mean"] = max(w2) / (sum(w2) / len(w2))
            result["rows"].append(row)
            print(f"  threads {kind}/{split}: {row['speedup_2_over_1']:.2f}× at 2 threads (kernel "
                  f"{row['kernel_speedup_2_over_1']:.2f}×), work max/mean {row['work_max_over_mean']:.3f}", flush=True)
    return result


def scaling_table(s: dict) -> str:
    lines = [f"Thread scaling of {s['layer']} ({'×'.join(map(str, s['shape']))}, input {'×'.join(map(str, s['input']))}"
             f", {s['ratio']}× pruned), CSR kernel:", "",
             "| weight | thread split | non-zeros per filter (min–max) | work per thread at 2 (non-zeros) | "
             "1 thread ms | 2 threads ms | per-thread ms at 2 (min ÷ max) | speedup 2 ÷ 1: wall | "
             "kernel (slowest thread) |",
             "|---|---|---|---|---:|---:|---|---:|---:|"]
    for r in s["rows"]:
        lo, hi = r["filter_nonzeros_min_max"]
        work = " / ".join(map(str, r["t2"]["work_per_thread"]))
        per_thread = " / ".join(f"{v:.2f}" for v in r["t2"]["thread_ms"])
        lines.append(f"| {r['weight']} | {r['split']} | {lo}–{hi} | {work} | {r['t1']['wall_ms']:.2f} | "
                     f"{r['t2']['wall_ms']:.2f} | {per_thread} ({r['thread_ms_min_over_max']:.3f}) | "
                     f"{r['speedup_2_over_1']:.2f}× | {r['kernel_speedup_2_over_1']:.2f}× |")
    return "\n".join(lines)


def table(rows: list[dict], a) -> str:
    b = f"b{a.batch}"
    head = ["row", "MAC reduction (ideal)", "dense b1 ms", "deployed b1", "runtime b1", f"dense {b} ms",
            f"dense + runtime pools {b}", f"deployed {b}", f"runtime {b}", "realized ÷ ideal",
            "weight bytes: dense / runtime / .etz", "max abs Δ", "convs: csr / gather / dense"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in rows:
        cells = [r["row"], f"{r['mac_reduction']:,.1f}×"]
        for key in ("b1", b):
            lat, sp = r["latency_ms"][key], r["speedup"][key]
            cells.append(f"{lat['dense']:.2f}")
            if key == b:
                cells.append(f"{lat['dense+pools']:.2f} ({sp['dense+pools']:.2f}×)")
            cells += [f"{lat['deployed']:.2f} ({sp['deployed']:.2f}×)", f"{lat['runtime']:.2f} ({sp['runtime']:.2f}×)"]
        impls = [c["impl"] for c in r["tuning"][b]["layers"] if c["weights"]]
        mem = r["memory"]
        cells += [f"{r['realized_over_ideal']:.3f}",
                  f"{mem['dense_bytes']:,} / {mem['runtime_bytes']:,} / {mem['etz_weight_bytes']:,}",
                  f"{max(r['max_abs_diff'].values()):.1e}",
                  " / ".join(str(impls.count(i)) for i in ("csr", "gather", "dense"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv=None):
    from bench.machine import add_quick

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"some of {', '.join(ROWS)}")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    add_quick(ap, "runtime", "batch 8, 2 warm-up + 5 runs, rows 100x-kernel and quickstart-mixture")
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.warmup, a.runs, a.rows = 8, 2, 5, "100x-kernel,quickstart-mixture"
    bad = [r for r in a.rows.split(",") if r not in ROWS]
    if bad:
        ap.error(f"--rows: unknown {', '.join(bad)} (expected some of {', '.join(ROWS)})")
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    from bench.machine import cpu_busy, describe, write_with_table
    from elastictrain.runtime import ext

    torch.set_num_threads(THREADS)
    busy = cpu_busy()
    kernels = ext.kernels()
    t0 = time.perf_counter()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="et-bench-runtime-") as tmp:
        a.tmp = Path(tmp)
        rows = [bench_row(r, a) for r in a.rows.split(",")]
    scaling = thread_scaling(a) if kernels is not None else None
    md = table(rows, a) + ("\n\n" + scaling_table(scaling) if scaling else "")
    print(md)
    result = {"benchmark": "runtime", "machine": describe(), "cpu_busy_before": busy,
              "settings": {"threads": THREADS, "batch": a.batch, "warmup": a.warmup, "runs": a.runs, "seed": a.seed,
                           "compiled_kernels": kernels is not None, "kernels_unavailable": ext.unavailable(),
                           "quick": a.quick},
              "seconds": time.perf_counter() - t0, "rows": rows, "thread_scaling": scaling}
    note = (f"Latency in ms (median of {a.runs} after {a.warmup} warm-up; speedup vs dense), {THREADS} threads, "
            f"{describe()['cpu_model']}; deployed = pruned channels removed, BN folded; runtime = each layer's "
            "fastest exact implementation after autotune.")
    write_with_table(result, a, "runtime", note, md)
    bad = [f"{r['row']} {k}: {v:.2g}" for r in rows for k, v in r["max_abs_diff"].items() if v > TOLERANCE]
    bad += [f"{r['row']} {k}: top-1 differs" for r in rows for k, v in r["top1_identical"].items() if not v]
    if bad:
        raise SystemExit(f"runtime: outputs differ from the masked model's: {'; '.join(bad)}")
    return result


if __name__ == "__main__":
    main()
