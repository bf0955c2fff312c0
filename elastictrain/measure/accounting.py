"""Compression accounting: what the seed reports, and the bits a stored model really needs.

Per conv/linear weight (constrained or not):
- ``params``, ``nonzeros``, ``pruning_ratio`` = params / nonzeros (``inf`` when nothing is non-zero,
  an empty layer included; ``files.json_safe`` writes it as null), ``density`` (0.0 for an empty layer);
- ``bits``: bits per stored non-zero value (the code width when quantized, else 32);
- ``nominal_bits`` = nonzeros × bits — the seed's accounting, whose ratio
  32·params / Σ nominal_bits reports 1000× pruning with 2-bit codes as 16000×;
- ``storage_bits`` = values + index + codebooks, the smallest of these concrete encodings:
  ``dense`` (every entry coded; a zero needs one more code when quantized),
  ``bitmap`` (1 bit per entry + the non-zero values),
  ``relative-w`` (Deep Compression's relative index: per non-zero a w-bit gap field, value 0 of the
  field = a filler that advances 2^w − 1 positions and carries no value; best w in 1..24),
  ``pattern`` (kernels whose support is one of P patterns: relative index over kernels + a
  ⌈log2 P⌉-bit pattern id per kept kernel + the P × R·S library bitmap + the values);
  plus ``codebook_bits`` = groups × 2^bits × 32 (fp32 codebook values). Per-tensor headers
  (shapes, widths — a few bytes) are not counted.
Biases and norm parameters are counted apart (``other_params``, stored as fp32).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from elastictrain.constraints.grid import as4d
from elastictrain.constraints.pattern import codes_of
from elastictrain.constraints.plan import LayerPlan, layer_kind

MAX_INDEX_WIDTH = 24


def relative_index_bits(positions: torch.Tensor, value_bits: int) -> tuple[int, int]:
    """(bits, width) of the cheapest relative-index encoding of sorted ``positions``."""
    if positions.numel() == 0:
        return 0, 1
    gaps = torch.diff(positions, prepend=positions.new_tensor([-1])).to(torch.int64)
    best = None
    for w in range(1, MAX_INDEX_WIDTH + 1):
        fillers = int(((gaps - 1) // ((1 << w) - 1)).sum())
        bits = positions.numel() * (w + value_bits) + fillers * w
        if best is None or bits < best[0]:
            best = (bits, w)
    return best  # type: ignore[return-value]


def _encodings(w4: torch.Tensor, value_bits: int, quantized: bool) -> dict[str, int]:
    flat = w4.reshape(-1) != 0
    params, nnz = flat.numel(), int(flat.sum())
    dense_bits = value_bits + 1 if quantized and nnz < params else value_bits
    enc = {"dense": params * dense_bits, "bitmap": params + nnz * value_bits}
    rel, width = relative_index_bits(flat.nonzero().squeeze(1), value_bits)
    enc[f"relative-{width}"] = rel
    F, C, R, S = w4.shape
    if R * S > 1 and nnz:
        support = (w4 != 0).reshape(F * C, R * S)
        alive = support.any(1)
        P = int(codes_of(support[alive]).unique().numel())
        kidx, _ = relative_index_bits(alive.nonzero().squeeze(1), math.ceil(math.log2(P)) if P > 1 else 0)
        enc["pattern"] = kidx + P * R * S + nnz * value_bits
    return enc


def layer_report(name: str, w: torch.Tensor, plan: Optional[LayerPlan]) -> dict:
    w4 = as4d(w.detach()).float()
    params = w4.numel()
    nz = w4[w4 != 0]
    nnz = nz.numel()
    bits = plan.bits if plan else 32
    quantized = bool(plan and plan.quantize)
    enc = _encodings(w4, bits, quantized)
    encoding = min(enc, key=enc.get)
    codebook_bits = plan.codebooks * (1 << bits) * 32 if quantized else 0
    return {
        "name": name,
        "kind": layer_kind(tuple(w.shape)),
        "shape": list(w.shape),
        "rule": plan.rule if plan else None,
        "params": params,
        "nonzeros": nnz,
        "density": nnz / params if params else 0.0,
        "pruning_ratio": params / nnz if nnz else math.inf,
        "bits": bits,
        "codebooks": plan.codebooks if quantized else 0,
        "unique_values": int(nz.unique().numel()),
        "nominal_bits": nnz * bits,
        "encoding": encoding,
        "index_value_bits": enc[encoding],
        "codebook_bits": codebook_bits,
        "storage_bits": enc[encoding] + codebook_bits,
    }


def report(weights: dict[str, torch.Tensor], plans: dict[str, LayerPlan]) -> dict:
    """Accounting for every conv/linear weight in ``weights`` and in total (see module doc)."""
    layers, other = [], 0
    for name, w in weights.items():
        if layer_kind(tuple(w.shape)) is None:
            other += w.numel() if torch.is_floating_point(w) else 0
            continue
        layers.append(layer_report(name, w, plans.get(name)))
    params = sum(l["params"] for l in layers)
    nnz = sum(l["nonzeros"] for l in layers)
    nominal = sum(l["nominal_bits"] for l in layers)
    storage = sum(l["storage_bits"] for l in layers)
    return {
        "format": "elastictrain.report/1",
        "total_params": params,
        "nonzeros": nnz,
        "density": nnz / params if params else 0.0,
        "pruning_ratio": params / nnz if nnz else math.inf,
        "nominal_bits": nominal,
        "nominal_compression": 32 * params / nominal if nominal else math.inf,
        "storage_bits": storage,
        "storage_compression": 32 * params / storage if storage else math.inf,
        "other_params": other,
        "model_storage_bits": storage + 32 * other,
        "model_compression": 32 * (params + other) / (storage + 32 * other) if storage + other else math.inf,
        "layers": layers,
    }


def format_table(rep: dict) -> str:
    """A fixed-width text table of a report, one line per layer and a total line."""
    head = (f"{'layer':<24}{'shape':>18}{'params':>11}{'nonzeros':>10}{'prune×':>9}{'bits':>5}{'books':>6}"
            f"{'uniq':>9}{'stored bits':>13}  encoding")
    rows = [head, "-" * len(head)]
    for l in rep["layers"]:
        rows.append(f"{l['name'][:24]:<24}{'×'.join(map(str, l['shape'])):>18}{l['params']:>11}{l['nonzeros']:>10}"
                    f"{l['pruning_ratio']:>9.1f}{l['bits']:>5}{l['codebooks']:>6}{l['unique_values']:>9}"
                    f"{l['storage_bits']:>13}  {l['encoding']}")
    rows.append("-" * len(head))
    rows.append(f"{'total':<24}{'':>18}{rep['total_params']:>11}{rep['nonzeros']:>10}{rep['pruning_ratio']:>9.1f}")
    rows.append(f"nominal compression (seed's: 32·params / Σ nonzeros·bits): {rep['nominal_compression']:.1f}×")
    rows.append(f"stored-bits compression (values + index + codebooks):     {rep['storage_compression']:.1f}×")
    rows.append(f"whole model incl. {rep['other_params']} bias/norm params at fp32:     "
                f"{rep['model_compression']:.1f}×")
    return "\n".join(rows)
