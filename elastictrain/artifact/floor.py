"""The information-theoretic floor of a compressed checkpoint's weights: what no encoding of
these same weights can beat under the natural source model of each part.

Per conv/linear weight (bits):
- ``mask_bits``: the mask's entropy at its level — log2 C(units, kept) for the cheapest exact
  description (element; whole units of the structured mask's grid, of kernels, filters or
  channels; kernel patterns, which add the pattern ids' empirical entropy and the P × R·S library
  bitmap). An unstructured mask at density d costs ≈ log2(e/d) bits per kept weight (11.4 at 1000×);
  the min over levels means structure is credited wherever the mask has it.
- ``value_bits``: quantized layers: kept × the empirical entropy of their codes over the layer
  (per layer, not per group: a per-group model would need its frequencies sent, which with ~16
  kept weights a group costs more than it saves); unquantized: kept × the dtype's bits (raw
  floats are taken as incompressible).
- ``codebook_bits``: the distinct codebook values that kept weights use, at the table's precision
  (fp32: 32 bits each); slots no kept weight uses are not counted.
Biases, norm parameters and buffers (``other_bits``) are counted apart, at their dtype's bits.
The checkpoint's ``pre_*`` masks are training state and count nowhere.
"""
from __future__ import annotations

import torch

from elastictrain import checkpoint
from elastictrain.artifact import entropy as ent
from elastictrain.artifact.layer import Analysis, analyse, bits_of, masked_model, spec_plans
from elastictrain.constraints.plan import layer_kind


def layer_floor(a: Analysis) -> dict:
    best = min(a.levels, key=lambda l: l.floor_bits())
    k = a.values.numel()
    if a.quant is not None:
        q = a.quant
        value_bits = ent.entropy_bits(q.codes)
        used = bits_of(q.table[q.gid, torch.from_numpy(q.codes)]).unique().numel() if k else 0
        codebook_bits = used * q.table.element_size() * 8
    else:
        value_bits, codebook_bits = k * a.w.element_size() * 8, 0
    mask_bits = best.floor_bits()
    return {"name": a.name, "params": a.w.numel(), "kept": k, "mask_level": best.kind, "mask_bits": mask_bits,
            "value_bits": value_bits, "codebook_bits": codebook_bits, "bits": mask_bits + value_bits + codebook_bits}


def floor_bits(ckpt: dict) -> dict:
    """Per-layer and total floor bits of ``ckpt``'s weights (module doc), other tensors apart —
    of the model ``export`` writes (weights outside their masks masked)."""
    bufs = checkpoint.buffers(ckpt)
    sd, _ = masked_model(checkpoint.model_state(ckpt), bufs.get("weight_mask") or {})
    plans = spec_plans(ckpt)
    layers, other_bits, other_params = [], 0, 0
    for name, t in sd.items():
        if torch.is_floating_point(t) and layer_kind(tuple(t.shape)) and t.numel():
            layers.append(layer_floor(analyse(name, t, bufs, plans.get(name))))
        else:
            other_bits += t.numel() * t.element_size() * 8
            other_params += t.numel()
    total = {k: sum(l[k] for l in layers)
             for k in ("params", "kept", "mask_bits", "value_bits", "codebook_bits", "bits")}
    return {**total, "weights_bits": total["bits"], "weights_bytes": total["bits"] / 8,
            "other_bits": other_bits, "other_params": other_params, "layers": layers}
