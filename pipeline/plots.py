"""PNG plots for ``elastictrain eval --plots`` and ``elastictrain report``: per-layer weight
histograms, a density chart, and accuracy against compression across stages and runs.

They live here, not in the library, so ``elastictrain`` does not depend on matplotlib. The "Agg"
backend is selected before anything else of matplotlib is imported (no display is ever needed), and
figures are built as ``matplotlib.figure.Figure`` objects rather than through pyplot, so nothing is
left registered in pyplot's global figure list by a long-running caller. Every PNG is written to a
temporary file beside its destination and renamed over it: a reader never sees half an image.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before any pyplot / backend import: headless

import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from elastictrain.constraints.plan import layer_kind  # noqa: E402
from elastictrain.files import atomic_write  # noqa: E402

BINS = 80
DPI = 100


def _save(fig: Figure, path: str | Path) -> Path:
    """savefig into a temporary PNG beside ``path``, then rename over it (``files.atomic_write``)."""
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    return path


def histogram_figure(weights: dict[str, torch.Tensor], title: str = "Non-zero weight values per layer") -> Figure:
    """One axes per conv/linear weight: histogram of its non-zero values (title: name, non-zeros)."""
    layers = [(n, w) for n, w in weights.items() if layer_kind(tuple(w.shape)) is not None]
    if not layers:
        raise ValueError("weight histograms: the state dict holds no conv (4-D) or linear (2-D) weight")
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[len(layers):]:
        ax.remove()  # the grid's unused cells: exactly one axes per layer remains
    for ax, (name, w) in zip(axes, layers):
        v = w.detach().reshape(-1).float()
        nz = v[v != 0]  # (nnz,)
        ax.set_title(f"{name}\nnnz {nz.numel():,} of {v.numel():,} ({nz.numel() / v.numel():.2%})", fontsize=9)
        ax.set_xlabel("weight value", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.tick_params(labelsize=7)
        if nz.numel():
            ax.hist(nz.numpy(), bins=BINS, color="tab:blue")
        else:
            ax.text(0.5, 0.5, "no non-zeros", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_xticks([])  # no data: the default 0..1 ticks would read as values
            ax.set_yticks([])
    fig.suptitle(title)
    return fig


def weight_histograms(weights: dict[str, torch.Tensor], path: str | Path,
                      title: str = "Non-zero weight values per layer") -> Path:
    """Write :func:`histogram_figure` as a PNG at ``path``; returns the path."""
    return _save(histogram_figure(weights, title), path)


def density_figure(report_or_summary: dict, title: str = "Per-layer density") -> Figure:
    """Per-layer density bars on a log axis; a layer with no non-zeros is marked "0" on the floor."""
    layers = report_or_summary.get("layers") or []
    if not layers:
        raise ValueError("density chart: the report holds no layers")
    names = [l["name"] for l in layers]
    dens = [float(l["density"]) for l in layers]
    positive = [d for d in dens if d > 0]
    floor = 10 ** math.floor(math.log10(min(positive) / 3)) if positive else 1e-6
    fig = Figure(figsize=(max(6.0, 0.5 * len(layers) + 2.5), 5.0), layout="constrained")
    ax = fig.subplots()
    x = range(len(layers))
    ax.bar(x, [d if d > 0 else float("nan") for d in dens], color="tab:blue")
    ax.set_yscale("log")
    ax.set_ylim(floor, 1.5)
    for i, (d, l) in enumerate(zip(dens, layers)):
        label = "0" if d == 0 else f"{d:.3g}"
        ax.text(i, floor * 1.15 if d == 0 else d * 1.08, label, ha="center", va="bottom", fontsize=7,
                color="tab:red" if d == 0 else "black")
    total = report_or_summary.get("density")
    if total:
        ax.axhline(total, color="tab:orange", linestyle="--", linewidth=1, label=f"all layers: {total:.3g}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("density (non-zeros / parameters, log)")
    ax.set_title(title)
    return fig


def density_chart(report_or_summary: dict, path: str | Path, title: str = "Per-layer density") -> Path:
    """Write :func:`density_figure` (from ``accounting.report`` or ``inspect.summary``) as a PNG; returns the path."""
    return _save(density_figure(report_or_summary, title), path)


def compression_figure(runs: dict[str, list[dict]]) -> Figure:
    """Top-1 accuracy against compression on a log axis, one colour per run, its stages in order:
    the nominal ratio (solid, circles, labelled with the stage) and the honest ratio of the packed
    artifact (dashed, squares). A stage's two points share its accuracy; a grey line joins them,
    so the gap between what the seed's accounting claims and what the file takes is visible.

    ``runs``: {run label: [{"stage", "top1" (fraction), "nominal", "honest"}, ...]}; a ratio that
    is None (unknown, or ∞ for an all-zero model) leaves its point out."""
    if not any(runs.values()):
        raise ValueError("accuracy/compression chart: no stages to plot")
    fig = Figure(figsize=(8.0, 5.5), layout="constrained")
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab10"]
    for i, (label, points) in enumerate(runs.items()):
        c = colors(i % 10)
        for key, style, marker, what in (("nominal", "-", "o", "nominal"), ("honest", "--", "s", "honest (model.etz)")):
            pts = [(p[key], 100 * p["top1"], p["stage"]) for p in points if p.get(key)]
            if pts:
                ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], linestyle=style, marker=marker, color=c,
                        label=f"{label}: {what}")
        for p in points:
            if p.get("nominal") and p.get("honest"):
                ax.plot([p["nominal"], p["honest"]], [100 * p["top1"]] * 2, color="0.75", linewidth=0.8, zorder=0)
            if p.get("nominal"):
                ax.annotate(p["stage"], (p["nominal"], 100 * p["top1"]), textcoords="offset points", xytext=(4, 5),
                            fontsize=7, color=c)
    ax.set_xscale("log")
    ax.margins(x=0.1, y=0.08)  # room for the stage labels beside the outermost points
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.set_xlabel("compression of conv/linear weights (×, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy vs compression per stage")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def compression_chart(runs: dict[str, list[dict]], path: str | Path) -> Path:
    """Write :func:`compression_figure` as a PNG at ``path``; returns the path."""
    return _save(compression_figure(runs), path)
