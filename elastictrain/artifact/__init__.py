"""The packed artifact (``.etz``): a compressed model as it would be stored, and its honest size.

``export(ckpt, path)`` writes a checkpoint's effective weights with each conv/linear weight's mask
at its own level (element, whole units, or kernel patterns: one position per kept unit and a
pattern id per kept kernel) coded as the smallest of a bitmap, Deep Compression's relative index
or Huffman-coded gaps; kept values as codebook codes (packed at their width or Huffman-coded)
with one small codebook table per layer, or raw in the weight's dtype when unquantized; biases,
norm parameters and buffers raw (fp32, or fp16 with ``bn_dtype="fp16"`` — lossy, so off by
default). ``load(path)`` gives back a checkpoint-shaped dict with bit-identical weights.
``floor_bits(ckpt)`` is the information-theoretic floor of the same weights (see ``floor``).

What is stored: model_state_dict, the weight_mask / structured_weight_mask / pattern_library /
quantization_table buffers (derived from the coded weight where they agree with it, else stored
raw), local_dict, spec and other JSON-serialisable top-level entries. Not stored: the ``pre_*``
masks (training state of the previous stage) and anything not JSON-serialisable beside tensors
(listed in the export report's ``dropped``). The container is described in ``format``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from elastictrain import checkpoint
from elastictrain.artifact import layer as lyr
from elastictrain.artifact.floor import floor_bits
from elastictrain.artifact.format import FIXED_BYTES, FORMAT, Payload, json_default, read, write
from elastictrain.constraints.plan import layer_kind
from elastictrain.progress import Progress, bar

__all__ = ["FORMAT", "export", "floor_bits", "load"]
TOP_KEYS = ("format", "model_state_dict", "elastic_trainer_state_dict", "local_dict", "spec")
RESTORED = ("weight_mask", "structured_weight_mask", "pattern_library", "quantization_table")


def _jsonable(d: dict) -> tuple[dict, list[str]]:
    kept, dropped = {}, []
    for k, v in d.items():
        try:
            json.dumps(v, default=json_default)
            kept[str(k)] = v
        except (TypeError, ValueError):
            dropped.append(str(k))
    return kept, dropped


def _mask_name(rec: dict) -> str:
    m = rec["mask"]
    where = m["level"] if m["level"] != "unit" else f"unit {'×'.join(map(str, m['parts']))}"
    pos = m["pos"]
    return (f"{where}/{pos['enc']}" + (f"-{pos['w']}" if pos["enc"] == "rel" else "")
            + (" inv" if pos.get("inv") else ""))


def _other_record(t: torch.Tensor, bn_dtype: str, put) -> dict:
    t = t.detach().cpu()
    stored = t
    if bn_dtype == "fp16" and t.dtype == torch.float32:
        half = t.half()
        if bool((torch.isfinite(half) == torch.isfinite(t)).all()):  # out of fp16 range: keep fp32
            stored = half
    return {**lyr.tensor_record(stored, put), "as": lyr.dtype_name(t.dtype)}


def export(ckpt: dict, path: str | Path, *, bn_dtype: str = "fp32", progress: Optional[Progress] = None) -> dict:
    """Write ``ckpt`` as an ``.etz`` artifact at ``path`` (atomically); returns its size report.

    ``bn_dtype`` is how biases / norm parameters are stored: "fp32" (default: bit-identical, the
    whole model round-trips) or "fp16" (half their bytes; loading casts back, values rounded).

    A weight with non-zero entries outside its 0/1 ``weight_mask`` (a checkpoint from other code,
    saved before its last masking) is written as the masked model, weight × mask — what the
    mask says the model is; the report's ``outside_mask`` counts them per layer.
    """
    if bn_dtype not in ("fp32", "fp16"):
        raise ValueError(f"bn_dtype: expected 'fp32' or 'fp16' (got {bn_dtype!r})")
    bufs = checkpoint.buffers(ckpt)
    sd, outside = lyr.masked_model(checkpoint.model_state(ckpt), bufs.get("weight_mask") or {})
    plans = lyr.spec_plans(ckpt)
    payload = Payload()
    tensors, layers, other = [], [], {"tensors": 0, "params": 0, "bytes": 0}
    base_bytes = 0
    pbar = bar(progress, sum(t.numel() for t in sd.values()), "export", "param")
    for name, t in sd.items():
        pbar.update(t.numel())
        base_bytes += t.numel() * t.element_size()
        if torch.is_floating_point(t) and layer_kind(tuple(t.shape)) and t.numel():
            rec, sizes = lyr.encode(lyr.analyse(name, t, bufs, plans.get(name)), payload.put)
            tensors.append({"name": name, "kind": "weight", **rec})
            layers.append({"name": name, "shape": list(t.shape), "params": t.numel(), "kept": rec["kept"],
                           "mask": _mask_name(rec), "values": rec["values"]["enc"],
                           **{f"{k}_bytes": v for k, v in sizes.items()},
                           "bytes": sum(sizes.values())})
        else:
            rec = _other_record(t, bn_dtype, payload.put)
            tensors.append({"name": name, "kind": "raw", **rec})
            other["tensors"] += 1
            other["params"] += t.numel()
            other["bytes"] += rec["blob"][1]
    pbar.close()
    local, dropped_local = _jsonable(dict(ckpt.get("local_dict") or {}))
    # other top-level entries of a checkpoint dict (not of a plain state dict): plain values only
    rest = {k: v for k, v in ckpt.items() if k not in TOP_KEYS} if "model_state_dict" in ckpt else {}
    extra, dropped = _jsonable({k: v for k, v in rest.items() if not isinstance(v, torch.Tensor)})
    dropped += [str(k) for k, v in rest.items() if isinstance(v, torch.Tensor)]
    spec, dropped_spec = _jsonable({"spec": ckpt.get("spec")})
    meta = {"format": FORMAT, "checkpoint_format": ckpt.get("format", checkpoint.FORMAT), "spec": spec.get("spec"),
            "local_dict": local, "extra": extra, "bn_dtype": bn_dtype, "tensors": tensors}
    file_bytes, meta_bytes = write(path, meta, payload)
    params = sum(l["params"] for l in layers)
    weights_bytes = sum(l["bytes"] for l in layers)
    return {
        "format": FORMAT, "path": str(path), "bytes": file_bytes,
        "header_bytes": meta_bytes + FIXED_BYTES, "weights_bytes": weights_bytes, "other_bytes": other["bytes"],
        "params": params, "kept": sum(l["kept"] for l in layers), "other_params": other["params"],
        "honest_compression": 32 * params / (8 * weights_bytes) if weights_bytes else math.inf,
        "model_compression": base_bytes / file_bytes,
        "bn_dtype": bn_dtype, "layers": layers, "outside_mask": outside,
        "dropped": [f"local_dict.{k}" for k in dropped_local] + dropped + (["spec"] if dropped_spec else []),
    }


MAX_BYTES = 1 << 31  # 2 GiB: the zoo's largest model (VGG16 on ImageNet, 553 MB at fp32) fits


def _declared_bytes(tensors: list) -> int:
    """Bytes the records' tensors take once decoded (weights, raw tensors, codebook tables), read
    off the metadata alone; decoding needs a small multiple of it at most."""
    total = 0
    for rec in tensors:
        size = lyr.DTYPES[rec["dtype"]].itemsize
        if rec["kind"] == "raw":  # cast on load to the dtype it had ("as")
            size = max(size, lyr.DTYPES[rec["as"]].itemsize)
        total += lyr.numel(rec["shape"]) * size
        table = rec["values"].get("table") if rec["kind"] == "weight" else None
        if table is not None:
            total += lyr.numel([table["G"], table["L"]]) * lyr.DTYPES[table["dtype"]].itemsize
    return total


def load(path: str | Path, *, max_bytes: int = MAX_BYTES) -> dict:
    """A checkpoint-shaped dict from an ``.etz`` artifact (module doc); ValueError naming the file
    and what is wrong for anything that is not a well-formed artifact — the only error type, for
    any file. An artifact whose metadata declares more than ``max_bytes`` of tensors is refused
    before anything is decoded (a lying header costs an error, not the memory it names)."""
    meta, blobs, nbytes = read(path)
    try:
        declared = _declared_bytes(meta["tensors"])
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise ValueError(f"{path}: corrupt artifact metadata ({type(e).__name__}: {str(e)[:200]})") from None
    if declared > max_bytes:
        raise ValueError(f"{path}: declares {declared:,} bytes of tensors, more than max_bytes={max_bytes:,} "
                         "(pass a larger max_bytes to load a model this big)")
    name = "?"
    sd: dict[str, torch.Tensor] = {}
    mb: dict[str, dict] = {k: {} for k in RESTORED}
    try:
        for rec in meta["tensors"]:
            name = rec["name"]
            if not isinstance(name, str) or name in sd:
                raise ValueError(f"tensor name {name!r} is not a string or not unique")
            if rec["kind"] == "weight":
                sd[name], b = lyr.decode(rec, blobs.get)
                for k, v in b.items():
                    mb[k][name] = v
            elif rec["kind"] == "raw":
                t = lyr.tensor_from(blobs.get(rec["blob"]), rec["dtype"], rec["shape"])
                sd[name] = t.to(lyr.DTYPES[rec["as"]])
            else:
                raise ValueError(f"unknown tensor kind {rec['kind']!r}")
        name = "?"
        if not (isinstance(meta["extra"], dict) and isinstance(meta["local_dict"], dict)):
            raise ValueError("extra and local_dict must be JSON objects")
        out = {**meta["extra"], "format": meta["checkpoint_format"], "model_state_dict": sd,
               "elastic_trainer_state_dict": {"model_buffers_state_dict": mb},
               "local_dict": dict(meta["local_dict"]), "spec": meta["spec"]}
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError, MemoryError) as e:
        what = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: corrupt artifact at tensor {name!r}: {type(e).__name__}: {what}") from None
    out["artifact"] = {"format": FORMAT, "path": str(path), "bytes": nbytes}
    return out
