"""Reports for people, beside the JSON for programs. Per stage: ``layers.parquet`` (one row per
constrained layer) and a short ``report.md``. Across the stages of one or more runs: one Markdown
table shaped like the seed's result table, plus PNG plots (``elastictrain report``).

Per-layer numbers are recounted from the stage's final weights (compression baked in) and its
plans, not copied from ``report.json``, so the table checks the report as much as it repeats it.
What the weights cannot tell — accuracy, the packed artifact's bytes — comes from ``report.json``.
"Nominal" is the seed's ratio, 32·params / Σ non-zeros·bits; "honest" is 32·params over the bytes
of the packed weights in ``model.etz`` (``elastictrain.artifact``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from elastictrain import checkpoint
from elastictrain.config import ConfigError
from elastictrain.constraints.grid import Grid
from elastictrain.constraints.plan import LayerPlan, describe_grid, layer_kind
from elastictrain.files import atomic_write
from elastictrain.measure.accounting import layer_report
from elastictrain.measure.structure import balance_stats

LAYERS_FORMAT = "elastictrain.layers/1"
LAYER_SCHEMA = pa.schema([
    ("name", pa.string()), ("kind", pa.string()), ("shape", pa.list_(pa.int64())), ("structure", pa.string()),
    ("params", pa.int64()), ("nonzeros", pa.int64()), ("density", pa.float64()), ("pruning_ratio", pa.float64()),
    ("bits", pa.int64()), ("codebooks", pa.int64()), ("unique_values", pa.int64()),
    ("balance_min", pa.int64()), ("balance_max", pa.int64()),  # non-zeros per workload; null: no balance
    ("encoding", pa.string()), ("storage_bits", pa.int64()),
], metadata={"format": LAYERS_FORMAT})
SEED_COLUMNS = ("Dataset", "Model", "Run", "Stage", "Overall Compression", "Pruning Ratio", "Pruning Structure",
                "Quantization Bits / Compression", "Codebooks per Layer", "Accuracy", "Robust Accuracy",
                "Honest Compression (model.etz)")


# ---- describing a plan ---------------------------------------------------------------------------

def balance_parts(plan: LayerPlan) -> Optional[tuple[int, int, int, int]]:
    """The workload grid (part counts) of the plan's last balanced or N:M step, else None."""
    work = [s.workload for s in plan.steps if s.workload is not None]
    return work[-1] if work else None


def describe_plan(plan: LayerPlan) -> Optional[str]:
    """The pruning structure in words ("pattern 4-of-9 + kernel", "balanced filter 16 × channel 4",
    "2:4"); None when the layer is not pruned (quantized only). Read from the resolved part counts,
    so a kernel of a linear layer (one element) reads as unstructured, which it is."""
    F, C, R, S = plan.shape4
    # later keys win where units coincide: a kernel of a linear or 1×1 layer is one element
    named = {(F, C, 1, 1): "kernel", (F, 1, 1, 1): "filter", (1, C, 1, 1): "channel", (F, C, R, S): "unstructured"}
    prunes, balance = [], None
    for s in plan.steps:
        if s.at_most:  # N:M: workload (F, C/m, R, S) keeps at most n
            prunes.append(f"{s.keep}:{C // s.workload[1]}")
            continue
        prunes.append(named.get(s.unit) or f"{describe_grid(s.unit)} blocks")
        balance = describe_grid(s.workload) if s.workload is not None else balance
    text = " → ".join(prunes)
    if balance is not None:
        text = f"balanced {balance}" if text == "unstructured" else f"{text}, balanced {balance}"
    if plan.pattern is not None:
        text = f"pattern {plan.pattern.entries}-of-{R * S}" + (f" + {text}" if text else "")
    return text or None


def describe_stage(plans: dict[str, LayerPlan]) -> str:
    """One structure for the stage: the layers' common one, "mixed (a; b)", or "-" (nothing pruned)."""
    kinds = list(dict.fromkeys(d for d in map(describe_plan, plans.values()) if d))
    return "-" if not kinds else kinds[0] if len(kinds) == 1 else f"mixed ({'; '.join(kinds)})"


# ---- one stage ----------------------------------------------------------------------------------

def layer_rows(weights: dict[str, torch.Tensor], plans: dict[str, LayerPlan]) -> list[dict]:
    """One row per planned layer, counted from ``weights`` (columns: :data:`LAYER_SCHEMA`)."""
    rows = []
    for name, plan in plans.items():
        if name not in weights:
            raise ValueError(f"stage tables: {name} is planned but not among the weights")
        w = weights[name].detach().cpu()
        rep = layer_report(name, w, plan)
        lo = hi = None
        work = balance_parts(plan)
        if work is not None:
            (b,) = balance_stats({name: w}, Grid(*work))
            assert "skipped" not in b, b  # resolve() already checked that the grid divides the layer
            lo, hi = b["min"], b["max"]
        rows.append({**{k: rep[k] for k in LAYER_SCHEMA.names if k in rep}, "structure": describe_plan(plan) or "dense",
                     "balance_min": lo, "balance_max": hi})
    return rows


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _times(x) -> str:
    """A ratio as the seed writes it: 823×, 51.4×, 1×; None (∞ or unknown) as -."""
    if x is None or x == float("inf"):
        return "-"
    return f"{x:,.0f}×" if x >= 100 else f"{x:.3g}×"


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _robust(report: dict) -> str:
    return ", ".join(f"{k} {_pct(v)}" for k, v in (report.get("robust") or {}).items()) or "-"


def _honest(report: dict) -> str:
    h, b = report.get("honest_compression"), report.get("artifact_bytes")
    return "-" if h is None else f"{_times(h)} ({b:,} B)" if b is not None else _times(h)


def stage_markdown(report: dict, rows: list[dict], plans: dict[str, LayerPlan]) -> str:
    head = (f"# {report.get('pipeline', '?')} — {report.get('stage', '?')} ({report.get('kind', '?')})\n\n"
            f"{report.get('model', '?')} on {report.get('data', '?')}, {report.get('epochs', '?')} epoch(s), "
            f"{report.get('world_size', 1)} process(es).\n\n"
            f"- accuracy: top-1 {_pct(report.get('top1'))}, top-5 {_pct(report.get('top5'))}\n"
            + (f"- robust accuracy: {_robust(report)}\n" if report.get("robust") else "")
            + f"- compression: pruning {_times(report.get('pruning_ratio'))}, "
              f"nominal {_times(report.get('nominal_compression'))} "
              f"(seed's accounting), stored bits {_times(report.get('storage_compression'))}, "
              f"honest {_honest(report)}\n"
            f"- structure: {describe_stage(plans)}\n\n")
    if not rows:
        return head + "No constrained layers: every weight is dense.\n"
    table = _md_table(["layer", "shape", "structure", "params", "non-zeros", "density", "pruning", "bits",
                       "codebooks", "unique values", "non-zeros per workload", "stored bits"],
                      [[r["name"], "×".join(map(str, r["shape"])), r["structure"], f"{r['params']:,}",
                        f"{r['nonzeros']:,}", f"{r['density']:.4f}", _times(r["pruning_ratio"]), str(r["bits"]),
                        str(r["codebooks"] or "-"), f"{r['unique_values']:,}",
                        "-" if r["balance_min"] is None else f"{r['balance_min']}–{r['balance_max']}",
                        f"{r['storage_bits']:,}"] for r in rows])
    return head + table + "\n"


def write_stage_tables(stage_dir: Path, report: dict, weights: dict[str, torch.Tensor],
                       plans: dict[str, LayerPlan]) -> None:
    """Write ``stage_dir/layers.parquet`` and ``stage_dir/report.md`` for a finished stage:
    ``weights`` its final (effective) weights, at least every planned one; ``plans`` its plans."""
    rows = layer_rows(weights, plans)
    table = pa.Table.from_pylist(rows, schema=LAYER_SCHEMA)
    atomic_write(Path(stage_dir) / "layers.parquet", lambda f: pq.write_table(table, f))
    text = stage_markdown(report, rows, plans).encode()
    atomic_write(Path(stage_dir) / "report.md", lambda f: f.write(text))


# ---- across runs --------------------------------------------------------------------------------

def _stage_order(run_dir: Path) -> list[Path]:
    """Stage folders holding a checkpoint: in ``pipeline.yaml``'s order when the run has one, the
    rest (and every stage of a run without one) in the order their checkpoints were written."""
    names: list[str] = []
    snap = run_dir / "pipeline.yaml"
    if snap.is_file():
        raw = yaml.safe_load(snap.read_text()) or {}
        names = [s.get("name") for s in raw.get("stages") or [] if isinstance(s, dict)]
    dirs = [d for d in run_dir.iterdir() if (d / "checkpoint.pt").is_file()]
    return sorted(dirs, key=lambda d: (names.index(d.name) if d.name in names else len(names),
                                       (d / "checkpoint.pt").stat().st_mtime_ns))


def _finished_stages(run_dir: Path) -> list[tuple[dict, dict]]:
    """(report, checkpoint) of every finished stage of a run, in stage order."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    out = []
    for d in _stage_order(run_dir):
        try:
            ckpt = checkpoint.load(d / "checkpoint.pt")
        except checkpoint.UnsafeCheckpoint:
            raise  # tampered with: named, never skipped quietly
        except ConfigError:
            continue  # unreadable: the stage will run again (as ``stage.is_finished`` treats it)
        rep = d / "report.json"
        if not ckpt.get("local_dict", {}).get("finished") or not rep.is_file():
            continue
        try:
            out.append((json.loads(rep.read_text()), ckpt))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{rep}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not out:
        raise ConfigError(f"{run_dir}: no finished stage (no STAGE/checkpoint.pt marked finished beside a report.json)")
    return out


def _seed_row(report: dict, plans: dict[str, LayerPlan]) -> list[str]:
    quant = [p for p in plans.values() if p.quantize is not None]
    bits = sorted({p.bits for p in quant})
    books = sorted({p.codebooks for p in quant})
    q = report.get("nominal_compression"), report.get("pruning_ratio")
    qx = q[0] / q[1] if q[0] and q[1] else None  # what the codes add to pruning
    bits_txt = "-" if not bits else f"{'–'.join(map(str, dict.fromkeys([bits[0], bits[-1]])))}/{_times(qx)}"
    books_txt = "-" if not books else "–".join(map(str, dict.fromkeys([books[0], books[-1]])))
    return [str(report.get("data", "?")), str(report.get("model", "?")), str(report.get("pipeline", "?")),
            str(report.get("stage", "?")), _times(report.get("nominal_compression")),
            _times(report.get("pruning_ratio")),
            describe_stage(plans), bits_txt, books_txt, _pct(report.get("top1")), _robust(report), _honest(report)]


def _labels(run_dirs: list[Path]) -> list[str]:
    """A file-name-safe label per run (its folder name; repeats get -2, -3 …)."""
    out: list[str] = []
    for d in run_dirs:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(d).resolve().name) or "run"
        label, n = base, 1
        while label in out:
            n += 1
            label = f"{base}-{n}"
        out.append(label)
    return out


def run_report(run_dirs: list[Path], out: Path | None = None) -> str:
    """The seed-shaped Markdown table of every finished stage of ``run_dirs`` (a blank row between
    runs), written to ``out/report.md`` (default: the first run's ``report/``) with PNG plots:
    ``accuracy_vs_compression.png``, and per run ``density_RUN.png`` / ``weights_RUN.png`` of its
    final stage. Returns the Markdown."""
    from .plots import compression_chart, density_chart, weight_histograms

    if not run_dirs:
        raise ConfigError("report: give at least one run directory")
    run_dirs = [Path(d) for d in run_dirs]
    out = Path(out) if out is not None else run_dirs[0] / "report"
    stages = [_finished_stages(d) for d in run_dirs]  # every run checked before anything is written
    rows: list[list[str]] = []
    points: dict[str, list[dict]] = {}
    images: list[tuple[str, str]] = []
    for label, d, run in zip(_labels(run_dirs), run_dirs, stages):
        if rows:
            rows.append([""] * len(SEED_COLUMNS))
        for report, ckpt in run:
            rows.append(_seed_row(report, checkpoint.plans(ckpt, str(d / report.get("stage", "?") / "checkpoint.pt"))))
        points[label] = [{"stage": r["stage"], "top1": r["top1"], "nominal": r.get("nominal_compression"),
                          "honest": r.get("honest_compression")} for r, _ in run]
        final, ckpt = run[-1]
        where = f"{final.get('pipeline', label)} — {final.get('stage')}"
        weights = {n: v for n, v in checkpoint.model_state(ckpt).items() if layer_kind(tuple(v.shape))}
        density_chart(final, out / f"density_{label}.png", title=f"Per-layer density: {where}")
        weight_histograms(weights, out / f"weights_{label}.png", title=f"Non-zero weight values: {where}")
        images += [(f"density of {where}", f"density_{label}.png"), (f"weights of {where}", f"weights_{label}.png")]
    compression_chart(points, out / "accuracy_vs_compression.png")
    text = ("# ElasticTrain results\n\n" + _md_table(list(SEED_COLUMNS), rows) + "\n\n"
            "Overall compression is the seed's nominal ratio, 32·params / Σ non-zeros·bits over conv/linear "
            "weights; honest compression is 32·params over the bytes of the packed weights in model.etz "
            "(whole file size in brackets). Quantization compression = nominal / pruning ratio.\n\n"
            "![accuracy vs compression](accuracy_vs_compression.png)\n\n"
            + "".join(f"![{alt}]({src})\n\n" for alt, src in images))
    atomic_write(out / "report.md", lambda f: f.write(text.encode()))
    return text
