"""Inspect a compressed state dict without data: what ``elastictrain eval`` prints besides accuracy.

Accounting (:mod:`.accounting`) says how many weights survive and what they cost to store. The
questions a hardware mapping asks next are about *where* they survive, each answered for a grid
(:mod:`.grid`) the user names, independently of the spec that produced the weights:
- ``structured_stats``: with a unit grid (kernel, filter, channel or any grid), how many units are
  entirely zero — what a structured accelerator can skip;
- ``balance_stats``: with a workload grid, the non-zeros per workload (min / max / mean, all
  equal?) — the slowest processing element sets the pace;
- ``codebook_stats``: with a group grid, the distinct non-zero values per group (max, mean) and the
  narrowest code that holds them — what a per-group lookup table must hold.
A layer the grid does not divide (``channel: 4`` on a 3-channel first conv) is reported with a
``skipped`` reason instead of failing the whole inspection.

JSON: :func:`summary` returns plain ints / floats / strings / lists; a non-finite float (the
pruning ratio of a layer with no non-zeros, ∞) becomes ``None``, as ``files.json_safe``
writes it. Legend: G = blocks of the grid, B = elements per block.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import yaml

from elastictrain.config import ConfigError, build
from elastictrain.constraints.grid import NAMED_UNITS, Grid, as4d, block_view
from elastictrain.constraints.plan import LayerPlan, layer_kind
from elastictrain.files import json_safe
from elastictrain.measure.accounting import format_table, report

GridLike = Union[Grid, str, dict]


def parse_grid(value: GridLike, where: str = "grid") -> Grid:
    """A Grid from a Grid, a unit name (``kernel``), a mapping or its YAML text (``{filter: 16, channel: 4}``)."""
    if isinstance(value, Grid):
        return value
    if isinstance(value, str):
        if value in NAMED_UNITS:
            return NAMED_UNITS[value]
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{where}: not a unit name or a grid mapping (got {value!r})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: unknown unit {value!r} (expected one of {', '.join(NAMED_UNITS)} or a grid "
                              "such as '{filter: 16, channel: 4}')")
    return build(Grid, value, where)  # the spec's own grid parser: unknown axes / bad parts name the field


def _layers(weights: dict[str, torch.Tensor]):
    """(name, 4-D float view) of every conv/linear weight, in order (the layers accounting reports)."""
    for name, w in weights.items():
        if layer_kind(tuple(w.shape)) is not None:
            yield name, as4d(w.detach()).float()


def _blocks(name: str, w: torch.Tensor, w4: torch.Tensor, grid: Grid) -> tuple[dict, Optional[torch.Tensor]]:
    """The layer's common fields and its (G, B) block rows, or a ``skipped`` reason and None."""
    head = {"name": name, "kind": layer_kind(tuple(w.shape)), "shape": list(w.shape)}
    try:
        parts = grid.parts(tuple(w4.shape), name)
    except ConfigError as e:
        return {**head, "skipped": str(e)}, None
    return {**head, "parts": list(parts)}, block_view(w4, parts)


def structured_stats(weights: dict[str, torch.Tensor], unit: GridLike) -> list[dict]:
    """Per layer: ``units``, ``zero_units`` (units with no non-zero), ``zero_fraction``; or ``skipped``."""
    grid, out = parse_grid(unit, "unit"), []
    for name, w4 in _layers(weights):
        row, x_GB = _blocks(name, weights[name], w4, grid)
        if x_GB is not None:
            zero_G = ~(x_GB != 0).any(1)  # (G,) the unit holds no non-zero
            units, zero = x_GB.shape[0], int(zero_G.sum())
            row.update(units=units, zero_units=zero, kept_units=units - zero, zero_fraction=zero / units)
        out.append(row)
    return out


def balance_stats(weights: dict[str, torch.Tensor], grid: GridLike) -> list[dict]:
    """Per layer: non-zeros per workload — ``min``, ``max``, ``mean``, ``equal``, ``imbalance`` = max/mean."""
    g, out = parse_grid(grid, "balance"), []
    for name, w4 in _layers(weights):
        row, x_GB = _blocks(name, weights[name], w4, g)
        if x_GB is not None:
            nnz_G = (x_GB != 0).sum(1)  # (G,) non-zeros per workload
            lo, hi, mean = int(nnz_G.min()), int(nnz_G.max()), float(nnz_G.double().mean())
            row.update(workloads=x_GB.shape[0], workload_size=x_GB.shape[1], min=lo, max=hi, mean=mean,
                       equal=lo == hi, imbalance=hi / mean if mean else 1.0)  # all-zero layer: balanced
        out.append(row)
    return out


def fits_bits(max_unique: int) -> int:
    """The narrowest code width b with max_unique ≤ 2^b (zero is pruned and takes no code): 4 → 2, 5 → 3."""
    return max(int(max_unique) - 1, 0).bit_length()


def unique_nonzero_per_row(x_GB: torch.Tensor) -> torch.Tensor:
    """(G, B) → (G,) number of distinct non-zero values in each row (-0.0 counts as zero)."""
    s_GB = x_GB.sort(1).values
    new_GB = torch.ones_like(s_GB, dtype=torch.bool)  # first occurrence of a value in its sorted row
    new_GB[:, 1:] = s_GB[:, 1:] != s_GB[:, :-1]
    return (new_GB & (s_GB != 0)).sum(1)


def codebook_stats(weights: dict[str, torch.Tensor], grid: GridLike) -> list[dict]:
    """Per layer: ``groups``, distinct non-zero values per group (``max_unique``, ``mean_unique``), ``fits_bits``."""
    g, out = parse_grid(grid, "groups"), []
    for name, w4 in _layers(weights):
        row, x_GB = _blocks(name, weights[name], w4, g)
        if x_GB is not None:
            u_G = unique_nonzero_per_row(x_GB)  # (G,)
            hi = int(u_G.max())
            row.update(groups=x_GB.shape[0], group_size=x_GB.shape[1], max_unique=hi,
                       mean_unique=float(u_G.double().mean()), fits_bits=fits_bits(hi))
        out.append(row)
    return out


def _section(rows: list[dict], grid: Grid, key: str) -> tuple[dict, list[dict]]:
    done = [r for r in rows if "skipped" not in r]
    return {key: grid.describe(), "layers": rows, "skipped": len(rows) - len(done)}, done


def summary(weights: dict[str, torch.Tensor], plans: Optional[dict[str, LayerPlan]] = None, *,
            unit: Optional[GridLike] = None, balance: Optional[GridLike] = None,
            groups: Optional[GridLike] = None) -> dict:
    """``accounting.report`` plus ``structured`` / ``balance`` / ``codebooks`` sections for the grids given."""
    out = report(weights, plans or {})
    if unit is not None:
        g = parse_grid(unit, "unit")
        sec, done = _section(structured_stats(weights, g), g, "unit")
        units, zero = sum(r["units"] for r in done), sum(r["zero_units"] for r in done)
        out["structured"] = {**sec, "units": units, "zero_units": zero, "zero_fraction": zero / units if units else 0.0}
    if balance is not None:
        g = parse_grid(balance, "balance")
        sec, done = _section(balance_stats(weights, g), g, "grid")
        out["balance"] = {**sec, "equal": all(r["equal"] for r in done),
                          "max_imbalance": max((r["imbalance"] for r in done), default=None)}
    if groups is not None:
        g = parse_grid(groups, "groups")
        sec, done = _section(codebook_stats(weights, g), g, "grid")
        hi = max((r["max_unique"] for r in done), default=0)
        out["codebooks"] = {**sec, "max_unique": hi, "fits_bits": fits_bits(hi)}
    return json_safe(out)


def _inf(x):
    return math.inf if x is None else x  # summary's None (∞) back to a number for format_table


def format_summary(s: dict) -> str:
    """Readable text of a :func:`summary`: the accounting table, then one table per section asked for."""
    rep = {**s,
           **{k: _inf(s[k]) for k in ("pruning_ratio", "nominal_compression", "storage_compression",
                                      "model_compression")},
           "layers": [{**l, "pruning_ratio": _inf(l["pruning_ratio"])} for l in s["layers"]]}
    parts = [f"density {s['density']:.5f}  ({s['nonzeros']} of {s['total_params']} conv/linear weights)",
             format_table(rep)]

    def table(title: str, head: str, rows: list[dict], line) -> None:
        parts.extend(["", title, head, "-" * len(head)])
        for r in rows:
            parts.append(f"{r['name'][:24]:<24}" + ("  skipped: " + r["skipped"] if "skipped" in r else line(r)))

    if "structured" in s:
        st = s["structured"]
        table(f"Structured sparsity — unit {{{st['unit']}}}: {st['zero_units']} of {st['units']} units entirely zero "
              f"({st['zero_fraction']:.1%})", f"{'layer':<24}{'units':>10}{'zero':>10}{'kept':>10}{'zero %':>9}",
              st["layers"],
              lambda r: f"{r['units']:>10}{r['zero_units']:>10}{r['kept_units']:>10}{r['zero_fraction']:>9.1%}")
    if "balance" in s:
        b = s["balance"]
        table(f"Workload balance — grid {{{b['grid']}}}: non-zeros per workload "
              f"{'all equal' if b['equal'] else 'NOT equal'} (worst max/mean {_inf(b['max_imbalance']):.2f})",
              f"{'layer':<24}{'workloads':>10}{'size':>8}{'min':>8}{'max':>8}{'mean':>10}{'max/mean':>9}  equal",
              b["layers"], lambda r: f"{r['workloads']:>10}{r['workload_size']:>8}{r['min']:>8}{r['max']:>8}"
                                     f"{r['mean']:>10.2f}{r['imbalance']:>9.2f}  {'yes' if r['equal'] else 'no'}")
    if "codebooks" in s:
        c = s["codebooks"]
        table(f"Codebooks — grid {{{c['grid']}}}: at most {c['max_unique']} distinct non-zero values per group "
              f"(fits {c['fits_bits']} bits)",
              f"{'layer':<24}{'groups':>10}{'size':>8}{'max uniq':>10}{'mean uniq':>11}{'bits':>6}",
              c["layers"],
              lambda r: (f"{r['groups']:>10}{r['group_size']:>8}{r['max_unique']:>10}{r['mean_unique']:>11.2f}"
                         f"{r['fits_bits']:>6}"))
    return "\n".join(parts)
