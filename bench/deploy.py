"""Benchmark: what deploying a filter-pruned model buys at inference — latency and peak memory of the
dense model vs ours (``elastictrain.deploy.shrink`` + ``fold_batchnorm``) vs Torch-Pruning removing
the same channels, in torch eager, ``torch.compile`` and onnxruntime, on this CPU.

Run from the repository root:

    .venv/bin/python bench/deploy.py [--models vgg16,resnet56,mobilenetv2,smallcnn] [--reductions 2,4]
                                     [--batch 64] [--warmup 5] [--runs 20] [--seed 0] [--channels-last] [--quick]

Models: VGG16, ResNet-56 and MobileNetV2 (3×32×32, 10 classes) from ``build_model`` and the
quickstart's SmallCNN (1×28×28), each initialised from ``--seed``, its BatchNorm scales and shifts
drawn at random and its running statistics measured on random images (as a trained model's are
non-trivial), so folding and exactness are not tested on identities.

Pruning (deterministic, no training): the coupled channel groups of ``channel_groups`` — a residual
stream (ResNet's stem conv, every conv2 and projection shortcut of a stage; MobileNetV2's
projections summed in a stage) or an expansion conv with its depthwise partner is ONE group — are
pruned as wholes, every group keeping the same fraction f of its channels (at least one) and
dropping those whose writers' filters have the smallest L2 norm. f is searched so that the MACs
of the shrunk model are closest to 1/R of the dense ones (``--reductions``); the achieved ratio is
what ``shrink`` reports. Each dropped channel has its filters, biases, depthwise filters and
BatchNorm scale and shift zeroed, so its output is exactly 0 (what coupled filter pruning in
training leaves). Groups that cannot go (the model input, the logits) are left whole.

For each model and reduction: ours = ``shrink`` then ``fold_batchnorm``; "ours, align N" = the same
with ``shrink(align=N)`` (``--aligns``, default 8: every group keeps a multiple of N channels, zero
ones kept back — exact, fewer MACs saved, widths that blocked CPU kernels like); Torch-Pruning =
``DependencyGraph`` removing the same channels of the same groups (bench/peer_libs.py; BatchNorm
kept, as it leaves it). Dense = the unpruned model (its shapes, so its latency, are the masked
model's). Latency: median ms of ``--runs`` calls after ``--warmup``, batch 1 and ``--batch``, the
variants of one model timed interleaved (each round runs every variant, in a rotating order, for
one untimed call and 5 timed ones, so drift of the machine hits all alike),
``torch.set_num_threads(2)``, eval mode under ``torch.inference_mode``; ``torch.compile`` with
inductor, ``freezing`` on (constant weights: what CPU inference wants), ``dynamic=False`` compiled
per batch size (compile seconds recorded; a failure is recorded as "failed: <reason>"); onnxruntime
from ``export_onnx`` (CPUExecutionProvider, 2 intra-op threads, spinning off: the sessions of a
model's variants are timed in turn, and an idle session's spinning threads would take the cores).
Peak RSS: a fresh interpreter imports torch, loads the model exported as ``.pt2`` (``torch.export``, no pickle), runs
``--warmup`` eager calls at ``--batch`` and reads its high-water mark ``VmHWM`` (reset after the
imports where /proc/self/clear_refs allows), reported
whole and as the part above the RSS before loading. (Not ``ru_maxrss``: Linux carries it across
exec, so a child of this process would report this process's size.) Exactness: max |Δ logits| of
ours (eager and onnxruntime) and Torch-Pruning's against the masked model on ``--batch`` images;
one above 1e-4 makes the run exit with an error after the results are written. ``--channels-last``
runs eager, compile and the RSS check in channels_last (NCHW is the default, as users run it).

Writes bench/results/deploy.json (machine, settings, every figure) and deploy.md (the table);
``--quick`` (3 warm-up, 5 timed runs, batch 8, smallcnn and vgg16 at 2×, Torch-Pruning in eager
only) writes deploy-quick.json only. Timings need idle cores: ``cpu_busy`` before the run is saved.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

SHAPES = {"vgg16": (3, 32, 32), "resnet56": (3, 32, 32), "mobilenetv2": (3, 32, 32), "smallcnn": (1, 28, 28)}
RUNTIMES = ("eager", "compile", "onnxruntime")
THREADS = 2
BLOCK = 5  # timed calls per variant in a row (after one untimed call), variants interleaved by block
TOLERANCE = 1e-4  # max |Δ logits| of a deployed model vs the masked one (fp32)


# ---- the models: dense, masked at a MAC reduction, deployed by us and by Torch-Pruning

def make_dense(name: str, seed: int) -> nn.Module:
    """The zoo model, initialised from ``seed``, with random BatchNorm affines (eval mode)."""
    from elastictrain.models import build_model

    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, in_channels=SHAPES[name][0])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return calibrate(model, name, seed)


def calibrate(model: nn.Module, name: str, seed: int) -> nn.Module:
    """BatchNorm running statistics measured on 64 random images (cumulative average), then eval."""
    g = torch.Generator().manual_seed(seed + 2)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(32, *SHAPES[name], generator=g))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def layer_macs(model: nn.Module, shape: tuple[int, ...]) -> dict[str, int]:
    """MACs per sample of each conv / linear module (what ``ShrinkReport`` counts)."""
    macs: dict[str, int] = {}

    def hook(name):
        def record(m, inp, out):
            macs[name] = macs.get(name, 0) + out[0].numel() * m.weight[0].numel()
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return macs


def predicted_macs(macs: dict[str, int], groups: list, kept: list[int]) -> int:
    """MACs once group i keeps ``kept[i]`` of its channels: each layer scaled by the kept fraction
    of its output channels and of its input features (a depthwise conv: of its one group)."""
    out_frac, in_kept, in_all = {}, {}, {}
    for g, k in zip(groups, kept):
        for name, _ in g.writes + g.passes:  # passes: BatchNorm (no MACs) and depthwise convs
            out_frac[name] = k / g.size
        for name, _, inner in g.reads:
            in_kept[name] = in_kept.get(name, 0) + k * inner
            in_all[name] = in_all.get(name, 0) + g.size * inner
    return round(sum(m * out_frac.get(n, 1.0) * (in_kept[n] / in_all[n] if n in in_all else 1.0)
                     for n, m in macs.items()))


def plan(model: nn.Module, shape: tuple[int, ...], reduction: float) -> dict:
    """Which channels of which group to drop so that the shrunk MACs are closest to 1/reduction."""
    from elastictrain.deploy import channel_groups

    groups = [g for g in channel_groups(model, torch.zeros(1, *shape)) if not g.fixed and g.writes]
    macs = layer_macs(model, shape)
    dense = sum(macs.values())
    best = None
    for f in torch.linspace(0.01, 1.0, 991).tolist():
        kept = [max(1, round(f * g.size)) for g in groups]
        err = abs(math.log(dense / predicted_macs(macs, groups, kept)) - math.log(reduction))
        if best is None or err < best[0]:
            best = (err, f, kept)
    _, f, kept = best
    drops = []
    for g, k in zip(groups, kept):
        norm2 = sum(model.get_submodule(n).weight.detach()[off:off + g.size].flatten(1).pow(2).sum(1)
                    for n, off in g.writes)
        drops.append(norm2.argsort()[:g.size - k].sort().values)  # (size - k,) lowest-norm channels
    return {"groups": groups, "drops": drops, "keep_fraction": f,
            "predicted_mac_ratio": dense / predicted_macs(macs, groups, kept)}


def apply_plan(model: nn.Module, p: dict, name: str, seed: int) -> nn.Module:
    """A masked copy: every dropped channel's filters, biases, depthwise filters and BatchNorm
    affines zeroed (its output exactly 0), then BatchNorm statistics re-measured."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for g, drop in zip(p["groups"], p["drops"]):
            for layer, off in g.writes + g.passes:
                m = model.get_submodule(layer)
                for t in (m.weight, m.bias):
                    if t is not None:
                        t[off + drop] = 0
    return calibrate(model, name, seed)


def deploy_ours(masked: nn.Module, shape: tuple[int, ...], align: int = 1) -> tuple[nn.Module, dict]:
    from elastictrain.deploy import shrink
    from elastictrain.deploy.export import fold_batchnorm

    t0 = time.perf_counter()
    small, report = shrink(masked, torch.zeros(1, *shape), align=align)
    folded = fold_batchnorm(small).eval()
    return folded, {"seconds": time.perf_counter() - t0, "mac_ratio": report.mac_ratio,
                    "params_shrunk": report.params_after, "shrink_max_abs_error": report.max_abs_error}


def deploy_torch_pruning(masked: nn.Module, p: dict, shape: tuple[int, ...]) -> tuple[nn.Module, dict]:
    from bench.peer_libs import torch_pruning_remove

    removals = [(g.writes[0][0], (g.writes[0][1] + drop).tolist()) for g, drop in zip(p["groups"], p["drops"])
                if len(drop)]
    t0 = time.perf_counter()
    model = torch_pruning_remove(masked, torch.zeros(1, *shape), removals)
    return model, {"seconds": time.perf_counter() - t0}


# ---- measuring

def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def runners(model: nn.Module, shape, runtime: str, batches: dict, fmt, onnx_path: Path) -> tuple[dict, dict]:
    """{batch key: callable on that batch's input} for one runtime, and its setup seconds per key."""
    if runtime == "eager":
        m = model.to(memory_format=fmt)
        return {k: m for k in batches}, {}
    if runtime == "compile":
        calls, setup = {}, {}
        m = model.to(memory_format=fmt)
        for k, x in batches.items():
            compiled = torch.compile(m, dynamic=False)  # one graph per batch size, as deployed
            t0 = time.perf_counter()
            with torch.inference_mode():
                compiled(x)
            calls[k], setup[k] = compiled, time.perf_counter() - t0
        return calls, setup
    run, seconds = onnx_runner(model, shape, onnx_path)
    return {k: (lambda x, run=run: run(x.numpy())) for k in batches}, {"export": seconds}


def latencies(models: dict[str, nn.Module], shape, a, tmp: Path, tag: str) -> tuple[dict, dict]:
    """{variant: {runtime: {"b1": ms, "bN": ms} or "failed: ..."}} and the setup seconds alike,
    the variants of one model timed interleaved in blocks (``bench.machine.interleaved_ms``)."""
    from bench.machine import interleaved_ms

    batches = {f"b{b}": torch.randn(b, *shape, generator=torch.Generator().manual_seed(b)) for b in (1, a.batch)}
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    xs = {k: x.to(memory_format=fmt) for k, x in batches.items()}
    out = {v: {} for v in models}
    setup = {v: {} for v in models}
    for runtime in RUNTIMES:
        calls = {}
        for v, model in models.items():
            if runtime not in a.runtimes_of(v):
                continue
            try:
                calls[v], setup[v][runtime] = runners(model, shape, runtime, xs, fmt, tmp / f"{tag}-{v}.onnx")
            except Exception as e:  # a runtime that cannot take this model is a result, not a crash
                out[v][runtime] = f"failed: {type(e).__name__}: {_first_line(e)}"
        for k, x in xs.items():
            with torch.inference_mode():
                for v, ms in interleaved_ms({v: calls[v][k] for v in calls}, x, a.warmup, a.runs, BLOCK).items():
                    out[v].setdefault(runtime, {})[k] = ms
        torch._dynamo.reset()
    return out, setup


def onnx_runner(model: nn.Module, shape, path: Path):
    """An onnxruntime session on ``export_onnx``'s file: (numpy batch → logits, export seconds)."""
    import onnxruntime as ort

    from elastictrain.deploy.export import export_onnx

    t0 = time.perf_counter()
    export_onnx(model.to(memory_format=torch.contiguous_format), torch.zeros(1, *shape), path)
    seconds = time.perf_counter() - t0
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    # several sessions are timed in turn: an idle one's threads must not spin on the cores the
    # running one needs (with spinning on, a switch costs up to 10× at batch 1)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (lambda x: session.run(None, {name: x})[0]), seconds


def max_abs(model: nn.Module, reference: torch.Tensor, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((model(x) - reference).abs().max())


def peak_rss(path: Path, shape, a) -> dict:
    """Peak RSS (MiB) of a fresh interpreter that loads ``path`` and runs it, and its RSS before loading."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-worker", str(path),
           "--worker-shape", ",".join(map(str, shape)), "--batch", str(a.batch), "--warmup", str(a.warmup)]
    if a.channels_last:
        cmd.append("--channels-last")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024  # kB


def rss_worker(a) -> None:
    torch.set_num_threads(THREADS)
    import elastictrain.models  # noqa: F401  (the dense model's classes; imported for every variant alike)

    before = _status_mib("VmRSS")
    try:  # "5": reset the high-water mark to the current RSS (Linux ≥ 4.0), dropping import transients
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    model = torch.export.load(a.rss_worker).module()  # exported in eval mode (dynamic batch)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    x = torch.randn(a.batch, *map(int, a.worker_shape.split(","))).to(memory_format=fmt)
    model = model.to(memory_format=fmt)
    with torch.inference_mode():
        for _ in range(a.warmup):
            model(x)
    peak = _status_mib("VmHWM")
    print(json.dumps({"peak_mib": peak, "before_load_mib": before, "over_imports_mib": peak - before}))


# ---- the run

def layer_shapes(model: nn.Module) -> dict[str, tuple]:
    """{name: (weight shape, groups)} of every conv and linear layer: the deployed architecture
    (by name: a traced model lists its modules in call order, the original in definition order)."""
    return {n: (tuple(m.weight.shape), getattr(m, "groups", 1)) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def bench_model(name: str, a, tmp: Path) -> list[dict]:
    from elastictrain.deploy.export import export_pt2

    shape = SHAPES[name]
    dense = make_dense(name, a.seed)
    dense_macs = sum(layer_macs(dense, shape).values())
    x = torch.randn(a.batch, *shape, generator=torch.Generator().manual_seed(a.seed + 3))
    models, rows = {"dense": dense}, {"dense": {"model": name, "variant": "dense", "target": None}}
    for r in a.reductions:
        p = plan(dense, shape, r)
        masked = apply_plan(dense, p, name, a.seed)
        with torch.inference_mode():
            reference = masked(x)
        base = {"model": name, "target": r, "keep_fraction": p["keep_fraction"],
                "predicted_mac_ratio": p["predicted_mac_ratio"], "channels_dropped": sum(len(d) for d in p["drops"]),
                "channels_prunable": sum(g.size for g in p["groups"])}
        ours, info = deploy_ours(masked, shape)
        models[f"ours-{r:g}"] = ours
        rows[f"ours-{r:g}"] = {**base, "variant": "ours", "deploy": info, "max_abs_diff": max_abs(ours, reference, x),
                               "reference": reference}
        try:
            tp, info = deploy_torch_pruning(masked, p, shape)
        except Exception as e:  # Torch-Pruning refusing a model is a result
            rows[f"tp-{r:g}"] = {**base, "variant": "torch-pruning", "failed": f"{type(e).__name__}: {_first_line(e)}"}
            continue
        models[f"tp-{r:g}"] = tp
        rows[f"tp-{r:g}"] = {**base, "variant": "torch-pruning", "deploy": info,
                             "max_abs_diff": max_abs(tp, reference, x), "reference": reference}
        # Torch-Pruning keeps BatchNorm; ours is folded: the same architecture means the same convs
        rows[f"ours-{r:g}"]["same_layers_as_torch_pruning"] = layer_shapes(ours) == layer_shapes(tp)
        for al in a.aligns:  # ours with every group's width rounded up to a multiple of ``al`` (still exact)
            model, info = deploy_ours(masked, shape, al)
            models[f"ours-{r:g}-a{al}"] = model
            rows[f"ours-{r:g}-a{al}"] = {**base, "variant": f"ours, align {al}", "align": al, "deploy": info,
                                         "max_abs_diff": max_abs(model, reference, x), "reference": reference}
    lat, setup = latencies(models, shape, a, tmp, f"{name}")
    for v, model in models.items():
        row = rows[v]
        path = tmp / f"{name}-{v}.pt2"
        export_pt2(model.eval(), x, path)  # the RSS worker loads it as a deployment would: no pickle
        row.update(params=params(model), macs=sum(layer_macs(model, shape).values()), latency_ms=lat[v],
                   setup_seconds=setup[v], peak_rss=peak_rss(path, shape, a))
        row["mac_ratio"] = dense_macs / row["macs"]
        reference = row.pop("reference", None)
        onnx_file = tmp / f"{name}-{v}.onnx"
        if reference is not None and onnx_file.exists():
            import onnxruntime as ort

            sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
            logits = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
            row["max_abs_diff_onnx"] = float((logits - reference).abs().max())
        print(f"  {name} {row['target']} {row['variant']}: {json.dumps(lat[v])}", flush=True)
    return [rows[v] for v in rows]


def fmt_ms(rows: list[dict], row: dict, runtime: str, key: str) -> str:
    v = row.get("latency_ms", {}).get(runtime)
    if v is None:
        return "—"
    if isinstance(v, str):
        return "failed"
    dense = next(r for r in rows if r["model"] == row["model"] and r["variant"] == "dense")["latency_ms"][runtime]
    if row["variant"] == "dense" or not isinstance(dense, dict):
        return f"{v[key]:.2f}"
    return f"{v[key]:.2f} ({dense[key] / v[key]:.2f}×)"


def table(rows: list[dict], a) -> str:
    b = f"b{a.batch}"
    head = ["model", "MAC cut target / achieved", "variant", "params"]
    for runtime in RUNTIMES:
        head += [f"{runtime} b1 ms", f"{runtime} {b} ms"]
    head += [f"peak RSS MiB ({b}, eager)", "max abs Δ (eager / ORT)", "conv/linear shapes = Torch-Pruning's"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for r in rows:
        target = "dense" if r["target"] is None else f"{r['target']:g}× / {r.get('mac_ratio', math.nan):.2f}×"
        if "failed" in r:
            lines.append(f"| {r['model']} | {target} | {r['variant']} | failed: {r['failed']} |")
            continue
        cells = [r["model"], target, r["variant"], f"{r['params']:,}"]
        for runtime in RUNTIMES:
            cells += [fmt_ms(rows, r, runtime, "b1"), fmt_ms(rows, r, runtime, b)]
        rss = r["peak_rss"]
        cells += [f"{rss['peak_mib']:.0f} (+{rss['over_imports_mib']:.0f})",
                  "—" if "max_abs_diff" not in r else f"{r['max_abs_diff']:.1e}" +
                  (f" / {r['max_abs_diff_onnx']:.1e}" if "max_abs_diff_onnx" in r else ""),
                  {True: "yes", False: "NO"}.get(r.get("same_layers_as_torch_pruning"), "")]
        lines.append("| " + " | ".join(cells) + " |")
    failures = [f"- {r['model']} {r['variant']} {runtime}: {v}" for r in rows
                for runtime, v in r.get("latency_ms", {}).items() if isinstance(v, str)]
    return "\n".join(lines + ([""] + failures if failures else []))


def inexact(rows: list[dict]) -> list[str]:
    """Rows whose logits differ from the masked model's by more than ``TOLERANCE``."""
    return [f"{r['model']} {r['target']:g}× {r['variant']}: {key} {r[key]:.2g}" for r in rows
            for key in ("max_abs_diff", "max_abs_diff_onnx") if r.get(key, 0) > TOLERANCE]


def parse(argv=None):
    from bench.machine import add_quick

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(SHAPES), help=f"some of {', '.join(SHAPES)}")
    ap.add_argument("--reductions", default="2,4", help="MAC reduction targets, e.g. 2,4")
    ap.add_argument("--batch", type=int, default=64, help="the large batch (batch 1 is always timed)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--channels-last", action="store_true", help="eager / compile / RSS in channels_last")
    ap.add_argument("--aligns", default="8", help="extra rows of ours with `shrink(align=N)`, e.g. 8,16 ('' for none)")
    add_quick(ap, "deploy", "3 warm-up + 5 runs, batch 8, smallcnn and vgg16 at 2x, Torch-Pruning eager only")
    ap.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-shape", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rss_worker is not None:
        return a
    a.tp_runtimes = RUNTIMES
    a.runtimes_of = lambda variant: a.tp_runtimes if variant.startswith("tp-") else RUNTIMES
    if a.quick:
        a.warmup, a.runs, a.batch, a.models, a.reductions, a.tp_runtimes = 3, 5, 8, "smallcnn,vgg16", "2", ("eager",)
    bad = [m for m in a.models.split(",") if m not in SHAPES]
    if bad:
        ap.error(f"--models: unknown {', '.join(bad)} (expected some of {', '.join(SHAPES)})")
    try:
        a.reductions = [float(r) for r in a.reductions.split(",")]
    except ValueError:
        ap.error(f"--reductions: not a comma-separated list of numbers: {a.reductions!r}")
    if any(r <= 1 for r in a.reductions):
        ap.error("--reductions: each must be > 1")
    try:
        a.aligns = [int(v) for v in a.aligns.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--aligns: not a comma-separated list of integers: {a.aligns!r}")
    if any(v < 2 for v in a.aligns):
        ap.error("--aligns: each must be ≥ 2")
    if a.warmup < 1 or a.runs < 1 or a.batch < 1:
        ap.error("--warmup, --runs and --batch must be positive")
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    if a.rss_worker is not None:
        rss_worker(a)
        return {}
    try:
        import onnxruntime
        import torch_pruning
    except ImportError as e:
        raise SystemExit(f"{e.name} is missing: run `make setup` (onnxruntime) and `make bench-setup` "
                         "(torch-pruning)") from None
    import torch._inductor.config as inductor

    from bench.machine import cpu_busy, describe, write_with_table

    torch.set_num_threads(THREADS)
    inductor.freezing = True  # weights as constants: oneDNN prepacks them (CPU inference's setting)
    busy = cpu_busy()
    if busy is not None and busy > 0.25:
        print(f"warning: the cores are {busy:.0%} busy before the run; with {THREADS} threads, timings under "
              "contention can be off by 100× (OpenMP waits for descheduled threads)", flush=True)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="et-bench-deploy-") as tmp:
        for name in a.models.split(","):
            rows += bench_model(name, a, Path(tmp))
    md = table(rows, a)
    print(md)
    result = {"benchmark": "deploy", "machine": describe(), "cpu_busy_before": busy,
              "settings": {"threads": THREADS, "tolerance": TOLERANCE, "batches": [1, a.batch], "warmup": a.warmup,
                           "runs": a.runs, "seed": a.seed, "reductions": a.reductions, "channels_last": a.channels_last,
                           "aligns": a.aligns,
                           "compile": {"backend": "inductor", "freezing": True, "dynamic": False},
                           "onnxruntime": {"version": onnxruntime.__version__, "intra_op_threads": THREADS,
                                           "allow_spinning": False,
                                           "provider": "CPUExecutionProvider"},
                           "torch_pruning": torch_pruning.__version__, "torch_pruning_runtimes": list(a.tp_runtimes),
                           "quick": a.quick},
              "seconds": time.perf_counter() - t0, "rows": rows}
    note = (f"Latency in ms (median of {a.runs} after {a.warmup} warm-up; speedup vs dense in the same runtime), "
            f"{THREADS} threads, {describe()['cpu_model']}; peak RSS of a fresh interpreter running the model "
            "eagerly (+ the part above its RSS before loading); max abs Δ: logits vs the masked model.")
    write_with_table(result, a, "deploy", note, md)
    bad = inexact(rows)
    if bad:
        raise SystemExit(f"deploy: logits differ from the masked model's by more than {TOLERANCE:g}: {'; '.join(bad)}")
    return result


if __name__ == "__main__":
    main()
