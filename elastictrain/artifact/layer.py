"""One conv/linear weight as stored: its support at the cheapest mask level, its kept values as
codebook codes (when every kept value is found in its group's codebook row) or raw, its codebook
table, and whichever checkpoint buffers cannot be derived from those.

Codebook groups. The codes need the group grid (``quant_parts``). It comes from the checkpoint's
spec when that resolves against the weights' shapes; otherwise it is inferred: every 4-axis grid
whose block count equals the table's rows is tried (filter-only splits first, e.g. G == F →
(F, 1, 1, 1)) and the first in which every kept value is bitwise equal to a value of its group's
row is used. Any grid that passes reconstructs the weights exactly, so the guess cannot corrupt
them; when none passes (or there is no table) the kept values are stored raw, in the weight's
own dtype (fp32 stays fp32: raw values must be bit-identical). The grid is stored in the artifact.

Codebook table (G, L): rows deduplicated bitwise (one row id per group, ``arange`` when all rows
differ), and each distinct row stored as its leading values up to where it only repeats its last
value (k-means pads unused slots that way; an empty group's row is L copies of one value).

Legend: w4 / mask4 (F, C, R, S); G codebook groups, L = 2^bits slots, U distinct rows, k kept.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from elastictrain import checkpoint
from elastictrain.artifact import entropy as ent
from elastictrain.artifact.masks import Level, decode_level, encode_level, levels, unit_any
from elastictrain.config import ConfigError
from elastictrain.constraints.grid import as4d, block_unview
from elastictrain.constraints.plan import LayerPlan, layer_kind

INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}
DTYPES = {n: getattr(torch, n) for n in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16",
                                         "int8", "uint8", "bool")}
MAX_GRID_TRIES = 256
MAX_ELEMENTS = 1 << 32  # per tensor: a larger shape in an artifact is refused, not allocated


def dtype_name(dt: torch.dtype) -> str:
    name = str(dt).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {name} is not storable (expected one of {', '.join(DTYPES)})")
    return name


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns as same-width ints (bitwise comparison: -0.0 ≠ 0.0)."""
    return t.view(INT_VIEW[t.dtype])


# --- raw tensors --------------------------------------------------------------------------------

def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes (bool: one bit per entry, packed)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        return np.packbits(flat.numpy()).tobytes()
    return flat.view(torch.uint8).numpy().tobytes()


def numel(shape) -> int:
    """Entries of a stored shape: a list of non-negative ints (ValueError for anything else)."""
    if not isinstance(shape, list) or any(type(d) is not int or d < 0 for d in shape):
        raise ValueError(f"bad shape {shape!r}")
    return math.prod(shape)


def tensor_from(blob: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    if dtype not in DTYPES or not isinstance(shape, list) or any(not isinstance(d, int) or d < 0 for d in shape):
        raise ValueError(f"bad tensor description (dtype {dtype!r}, shape {shape!r})")
    n, dt = math.prod(shape), DTYPES[dtype]
    if n > MAX_ELEMENTS:
        raise ValueError(f"tensor of {n} entries exceeds {MAX_ELEMENTS}")
    if dt == torch.bool:
        if len(blob) != (n + 7) // 8:
            raise ValueError(f"{len(blob)} bytes for a bool tensor of {n} entries")
        return torch.from_numpy(np.unpackbits(np.frombuffer(blob, dtype=np.uint8))[:n].astype(bool)).reshape(shape)
    size = torch.empty(0, dtype=dt).element_size()
    if len(blob) != n * size:
        raise ValueError(f"{len(blob)} bytes for {n} {dtype} entries")
    if n == 0:
        return torch.zeros(shape, dtype=dt)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dt).reshape(shape).clone()


def tensor_record(t: torch.Tensor, put: Callable[[bytes], list]) -> dict:
    return {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "blob": put(tensor_bytes(t))}


# --- analysis: what the weight is made of -------------------------------------------------------

@dataclass
class Quant:
    parts: tuple[int, ...]   # codebook group grid
    gid: torch.Tensor        # (k,) group of every kept entry
    codes: np.ndarray        # (k,) slot in the group's row (first bitwise match)
    table: torch.Tensor      # (G, L)


@dataclass
class Analysis:
    name: str
    w: torch.Tensor
    shape4: tuple[int, ...]
    support4: torch.Tensor               # bool (F, C, R, S): entries whose values are stored
    values: torch.Tensor                 # (k,) kept values, flat row-major order, the weight's dtype
    buffers: dict[str, torch.Tensor]     # this weight's checkpoint buffers
    quant: Optional[Quant]
    levels: list[Level]


def group_ids(shape4: tuple[int, ...], parts: tuple[int, ...]) -> torch.Tensor:
    """Codebook group of every entry, flat row-major: (F·C·R·S,)."""
    G = math.prod(parts)
    B = math.prod(shape4) // G
    return block_unview(torch.arange(G)[:, None].expand(G, B), shape4, parts).reshape(-1)


def _grid_candidates(shape4: tuple[int, ...], G: int, plan: Optional[LayerPlan]) -> list[tuple[int, ...]]:
    first = ([tuple(plan.quant_parts)]
             if plan is not None and plan.quant_parts and math.prod(plan.quant_parts) == G else [])
    divs = [[d for d in range(1, n + 1) if n % d == 0] for n in shape4]   # loops over axis divisors
    rest = sorted((p for p in itertools.product(*divs) if math.prod(p) == G),
                  key=lambda p: (sum(x > 1 for x in p), [-x for x in p]))
    return list(dict.fromkeys(first + rest))[:MAX_GRID_TRIES]


def _find_codes(shape4, support_flat: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                plan: Optional[LayerPlan]) -> Optional[Quant]:
    if table.dim() != 2 or not torch.is_floating_point(table) or table.dtype not in INT_VIEW or 0 in table.shape:
        return None
    if values.dtype not in INT_VIEW or table.shape[1] > ent.MAX_ALPHABET:
        return None
    book_bits = bits_of(table.to(values.dtype))                     # (G, L) in the weight's dtype
    v_bits = bits_of(values)[:, None]
    for parts in _grid_candidates(shape4, table.shape[0], plan):
        gid = group_ids(shape4, parts)[support_flat]
        match_kL = book_bits[gid] == v_bits
        if bool(match_kL.any(1).all()):
            return Quant(parts, gid, match_kL.to(torch.int8).argmax(1).numpy().astype(np.int64), table)
    return None


def binary(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A mask of any dtype as bool when every entry is 0 or 1 (bool; float masks as PyTorch-style
    pruning code writes them, without -0.0; uint8 / int masks), else None."""
    if t is None:
        return None
    if t.dtype == torch.bool:
        return t
    if t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
                       torch.int16, torch.int32, torch.int64):
        return None
    one = t == 1
    if not bool(((t == 0) | one).all()) or (t.is_floating_point() and bool(torch.signbit(t).any())):
        return None
    return one


def masked_model(sd: dict, masks: dict) -> tuple[dict, dict[str, int]]:
    """(``sd`` with each weight multiplied by its 0/1 mask where non-zeros lie outside it,
    {weight: how many there were}); weights that agree with their masks are left as they are."""
    out, outside = dict(sd), {}
    for name, m in masks.items():
        w, keep = sd.get(name), binary(m.detach().cpu()) if isinstance(m, torch.Tensor) else None
        if keep is None or not isinstance(w, torch.Tensor) or w.shape != keep.shape or not w.is_floating_point():
            continue
        n = int(((w.detach().cpu() != 0) & ~keep).sum())
        if n:
            out[name], outside[name] = torch.where(keep.to(w.device), w, torch.zeros((), dtype=w.dtype)), n
    return out, outside


def analyse(name: str, w: torch.Tensor, buffers: dict[str, dict], plan: Optional[LayerPlan]) -> Analysis:
    w = w.detach().cpu()
    shape4 = tuple(as4d(w).shape)
    bufs = {k: v[name].detach().cpu() for k, v in buffers.items()
            if isinstance(v, dict) and isinstance(v.get(name), torch.Tensor)}
    nonzero = (bits_of(w) != 0) if w.dtype in INT_VIEW else (w != 0)
    wm = binary(bufs.get("weight_mask"))
    support = nonzero | wm if wm is not None and wm.shape == w.shape else nonzero
    support4 = support.reshape(shape4)
    flat = support4.reshape(-1)
    values = w.reshape(-1)[flat]
    table = bufs.get("quantization_table")
    quant = _find_codes(shape4, flat, values, table, plan) if table is not None else None
    structured, library = binary(bufs.get("structured_weight_mask")), binary(bufs.get("pattern_library"))
    lvls = levels(support4, structured, library)
    return Analysis(name, w, shape4, support4, values, bufs, quant, lvls)


def spec_plans(ckpt: dict) -> dict[str, LayerPlan]:
    """The checkpoint spec's plans (``checkpoint.plans``), or {} when there is none or it does not
    resolve here: the artifact is then written with every layer's mask and values as they are."""
    try:
        return checkpoint.plans(ckpt, from_tables=False)
    except ConfigError:
        return {}


# --- codebook tables ----------------------------------------------------------------------------

def encode_table(table: torch.Tensor) -> tuple[dict, dict[str, bytes]]:
    G, L = table.shape
    bits_GL = bits_of(table)
    uniq, inv = torch.unique(bits_GL, dim=0, return_inverse=True)
    U = uniq.shape[0]
    first_U = torch.full((U,), G).scatter_reduce(0, inv, torch.arange(G), "amin")
    order = first_U.argsort()
    rank = torch.empty(U, dtype=torch.int64)
    rank[order] = torch.arange(U)
    rows_UL = table[first_U[order]]                                  # distinct rows, first-seen order
    same_UL = bits_of(rows_UL) == bits_of(rows_UL)[:, -1:]
    n_U = L - same_UL.flip(1).to(torch.int64).cumprod(1).sum(1) + 1   # leading values worth storing
    vals = rows_UL[torch.arange(L)[None, :] < n_U[:, None]]
    ids_p, ids_b = ent.encode_ints(rank[inv].numpy())
    cnt_p, cnt_b = ent.encode_ints((n_U - 1).numpy())
    rec = {"dtype": dtype_name(table.dtype), "G": G, "L": L, "U": U, "nv": int(vals.numel()),
           "ids": ids_p, "counts": cnt_p}
    return rec, {"ids": ids_b, "counts": cnt_b, "vals": tensor_bytes(vals)}


def decode_table(rec: dict, blobs: dict[str, bytes]) -> torch.Tensor:
    G, L, U, nv = (int(rec[k]) for k in ("G", "L", "U", "nv"))
    if not (1 <= U <= G and 1 <= L <= ent.MAX_ALPHABET and U <= nv <= U * L):
        raise ValueError(f"bad codebook table (G={G}, L={L}, U={U}, {nv} values)")
    ids = torch.from_numpy(ent.decode_ints(rec["ids"], blobs["ids"], G))
    n_U = torch.from_numpy(ent.decode_ints(rec["counts"], blobs["counts"], U)) + 1
    if int(n_U.sum()) != nv or int(n_U.max()) > L or (G and (int(ids.min()) < 0 or int(ids.max()) >= U)):
        raise ValueError("codebook row ids or lengths out of range")
    vals = tensor_from(blobs["vals"], rec["dtype"], [nv])
    start_U = n_U.cumsum(0) - n_U
    rows_UL = vals[start_U[:, None] + torch.minimum(torch.arange(L)[None, :], n_U[:, None] - 1)]
    return rows_UL[ids]


# --- one weight: encode / decode ----------------------------------------------------------------

def _level_size(enc: tuple[dict, dict[str, bytes]]) -> int:
    return sum(len(b) for b in enc[1].values())


def encode(a: Analysis, put: Callable[[bytes], list]) -> tuple[dict, dict]:
    """(record, byte sizes by part) for an analysed weight; blobs go through ``put``."""
    encs = [(lvl, encode_level(lvl)) for lvl in a.levels]
    lvl, (mrec, mblobs) = min(encs, key=lambda e: _level_size(e[1]))
    rec = {"dtype": dtype_name(a.w.dtype), "shape": list(a.w.shape),
           "mask": {**mrec, "blobs": {k: put(b) for k, b in mblobs.items()}}}
    sizes = {"mask": _level_size((mrec, mblobs)), "values": 0, "codebook": 0, "buffers": 0}
    k = a.values.numel()
    if a.quant is not None:
        cp, cb = ent.encode_ints(a.quant.codes)
        trec, tblobs = encode_table(a.quant.table)
        rec["values"] = {"enc": "codes", "parts": list(a.quant.parts), "codes": cp, "blob": put(cb),
                         "table": {**trec, "blobs": {n: put(b) for n, b in tblobs.items()}}}
        sizes["values"], sizes["codebook"] = len(cb), sum(len(b) for b in tblobs.values())
    else:
        vb = tensor_bytes(a.values)
        rec["values"] = {"enc": "raw", "blob": put(vb)}
        sizes["values"] = len(vb)
    rec["kept"] = k
    bufs = {}
    wm = binary(a.buffers.get("weight_mask"))
    wm_is_support = (wm is not None and wm.shape == a.w.shape and torch.equal(wm, a.support4.reshape(wm.shape)))

    def as_dtype(t: torch.Tensor) -> dict:  # a mask stored as a derivation, cast back to its own dtype
        return {} if t.dtype == torch.bool else {"dtype": dtype_name(t.dtype)}

    for key, t in a.buffers.items():
        if key == "weight_mask" and wm_is_support:
            bufs[key] = "support" if t.dtype == torch.bool else {"derive": "support", **as_dtype(t)}
        elif key == "quantization_table" and a.quant is not None:
            bufs[key] = "derived"
        elif key == "pattern_library" and lvl.kind == "pattern" and lvl.from_buffer and t.dtype == torch.bool:
            bufs[key] = "derived"
        elif (key == "structured_weight_mask" and wm_is_support and (units := binary(t)) is not None and t.dim() == 4
              and not any(d % p for d, p in zip(a.shape4, t.shape))
              and torch.equal(unit_any(a.support4, tuple(t.shape)), units)):
            bufs[key] = {"derive": "unit_any", "shape": list(t.shape), **as_dtype(t)}
        elif key in ("weight_mask", "structured_weight_mask", "pattern_library", "quantization_table"):
            bufs[key] = tensor_record(t, put)
            sizes["buffers"] += bufs[key]["blob"][1]
    rec["buffers"] = bufs
    return rec, sizes


def _mask_dtype(how) -> torch.dtype:
    name = how.get("dtype", "bool") if isinstance(how, dict) else "bool"
    if name not in DTYPES:
        raise ValueError(f"bad mask dtype {name!r}")
    return DTYPES[name]


def decode(rec: dict, get: Callable[[list], bytes]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weight, its buffers) from :func:`encode`'s record."""
    dtype, shape = rec["dtype"], rec["shape"]
    if dtype not in ("float32", "float64", "float16", "bfloat16"):
        raise ValueError(f"bad weight dtype {dtype!r}")
    if (not isinstance(shape, list) or layer_kind(tuple(shape)) is None
            or any(not isinstance(d, int) or d < 1 for d in shape)
            or math.prod(shape) > MAX_ELEMENTS):
        raise ValueError(f"bad weight shape {shape!r}")
    dt = DTYPES[dtype]
    shape4 = tuple(shape) + (1,) * (4 - len(shape))
    m = rec["mask"]
    mask4, library = decode_level(m, {k: get(r) for k, r in m["blobs"].items()}, shape4)
    flat = mask4.reshape(-1)
    idx = flat.nonzero().squeeze(1)                                   # kept entries, row-major
    k = idx.numel()
    if k != int(rec["kept"]):
        raise ValueError(f"mask keeps {k} entries, the record says {rec['kept']}")
    v = rec["values"]
    table = None
    if v["enc"] == "raw":
        values = tensor_from(get(v["blob"]), dtype, [k])
    elif v["enc"] == "codes":
        t = v["table"]
        table = decode_table(t, {n: get(r) for n, r in t["blobs"].items()})
        parts = tuple(int(p) for p in v["parts"])
        if len(parts) != 4 or any(p < 1 or d % p for d, p in zip(shape4, parts)) or math.prod(parts) != table.shape[0]:
            raise ValueError(f"codebook grid {list(parts)} does not fit shape {shape} and {table.shape[0]} codebooks")
        codes = torch.from_numpy(ent.decode_ints(v["codes"], get(v["blob"]), k))
        if k and (int(codes.min()) < 0 or int(codes.max()) >= table.shape[1]):
            raise ValueError("codes outside the codebook rows")
        values = table.to(dt)[group_ids(shape4, parts)[idx], codes]
    else:
        raise ValueError(f"unknown value encoding {v['enc']!r}")
    w = torch.zeros(math.prod(shape4), dtype=dt)
    w[idx] = values
    bufs: dict[str, torch.Tensor] = {}
    spec = rec.get("buffers", {})
    for key in ("weight_mask", "structured_weight_mask", "pattern_library", "quantization_table"):
        how = spec.get(key)
        if how is None:
            continue
        if isinstance(how, dict) and "blob" in how:
            bufs[key] = tensor_from(get(how["blob"]), how["dtype"], how["shape"])
        elif key == "structured_weight_mask" and isinstance(how, dict) and "weight_mask" in bufs:
            parts = tuple(int(p) for p in how["shape"])
            if len(parts) != 4 or any(p < 1 or d % p for d, p in zip(shape4, parts)):
                raise ValueError(f"structured mask grid {list(parts)} does not divide shape {shape}")
            bufs[key] = unit_any(mask4, parts).to(_mask_dtype(how))
        elif key == "weight_mask" and (how == "support" or (isinstance(how, dict) and how.get("derive") == "support")):
            bufs[key] = mask4.reshape(shape).to(_mask_dtype(how))
        elif key == "quantization_table" and how == "derived" and table is not None:
            bufs[key] = table
        elif key == "pattern_library" and how == "derived" and library is not None:
            bufs[key] = library
        else:
            raise ValueError(f"buffer {key}: cannot derive {how!r}")
    return w.reshape(shape), bufs
