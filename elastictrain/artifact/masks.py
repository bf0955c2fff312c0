"""Masks as stored: a set of kept positions, coded at the level the mask lives on.

A *position set* (k kept of n, flat row-major order) is stored as the smallest of
- ``all`` / ``none`` (no bytes), ``bitmap`` (n bits);
- ``rel``: Deep Compression's relative index — per kept entry a w-bit field holding the distance
  to it (1..2^w−1), field value 0 = a filler advancing 2^w−1 positions; best w in 1..24;
- ``gaps``: the zero-run before each kept entry, split Rice-style into a quotient (Huffman-coded,
  symbol ``Q`` = a filler advancing Q·2^k positions) and k raw low bits; best k in 0..24.
  For geometric gaps this is within ~1% of log2 C(n, k).
``rel`` and ``gaps`` may code the complement (the pruned positions) when more than half is kept.

A *level* says what the positions are of (see :func:`levels`): ``element`` (the weight's own
entries), ``unit`` (blocks of a grid — kernels, filters, channels or the structured mask's grid —
kept whole: one position per unit) or ``pattern`` (kernels: kept kernels as positions + one
pattern id per kept kernel + the P × R·S library bitmap).

Legend: w4 / mask4 are (F, C, R, S); N = F·C kernels, K = R·S positions in a kernel, P = patterns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from elastictrain.artifact import entropy as ent
from elastictrain.constraints.grid import block_unview
from elastictrain.constraints.pattern import codes_of, library_from_codes

MAX_WIDTH = 24
QUOTIENTS = 32  # gap quotient alphabet before the filler symbol


# --- position sets ------------------------------------------------------------------------------

def _rel_fields(pos_k: np.ndarray, w: int) -> np.ndarray:
    d_k = np.diff(pos_k, prepend=-1)                       # distance to each kept entry, ≥ 1
    span = (1 << w) - 1
    f_k = (d_k - 1) // span                                  # fillers before it
    out = np.zeros(int(f_k.sum()) + pos_k.size, dtype=np.int64)
    out[np.cumsum(f_k + 1) - 1] = d_k - f_k * span
    return out


def _gap_symbols(pos_k: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    g_k = np.diff(pos_k, prepend=-1) - 1                     # zeros before each kept entry
    q_k = g_k >> k
    f_k = q_k // QUOTIENTS
    sym = np.full(int(f_k.sum()) + pos_k.size, QUOTIENTS, dtype=np.int64)
    sym[np.cumsum(f_k + 1) - 1] = q_k % QUOTIENTS
    return sym, g_k & ((1 << k) - 1)


def _best_gaps(pos_k: np.ndarray) -> tuple[int, int]:
    """(bits, k) of the cheapest gap coding of ``pos_k``."""
    g_k = np.diff(pos_k, prepend=-1) - 1
    best = None
    for k in range(0, MAX_WIDTH + 1):
        q_k = g_k >> k
        freq = np.bincount(q_k % QUOTIENTS, minlength=QUOTIENTS + 1)
        freq[QUOTIENTS] += int((q_k // QUOTIENTS).sum())
        bits = ent.huffman_bits(freq[: int(np.flatnonzero(freq).max()) + 1]) + 8 * ((pos_k.size * k + 7) // 8)
        if best is None or bits < best[0]:
            best = (bits, k)
        if (g_k >> k).max(initial=0) == 0:
            break
    return best  # type: ignore[return-value]


def _encode_set(pos_k: np.ndarray) -> list[tuple[dict, bytes]]:
    """Candidate (params, blob) codings of a non-empty sorted position set."""
    out = []
    d_k = np.diff(pos_k, prepend=-1)
    w = min(range(1, MAX_WIDTH + 1), key=lambda w: (pos_k.size + int(((d_k - 1) // ((1 << w) - 1)).sum())) * w)
    fields = _rel_fields(pos_k, w)
    out.append(({"enc": "rel", "w": w, "nf": int(fields.size)}, ent.pack_bits(fields, w)))
    _, k = _best_gaps(pos_k)
    sym, low = _gap_symbols(pos_k, k)
    huff = ent.huffman_encode(sym)
    out.append(({"enc": "gaps", "k": k, "ns": int(sym.size), "hb": len(huff)}, huff + ent.pack_bits(low, k)))
    return out


def encode_positions(keep_n: np.ndarray) -> tuple[dict, bytes]:
    """The smallest coding of a flat bool mask (module doc): (params, blob)."""
    n, k = keep_n.size, int(np.count_nonzero(keep_n))
    if k == n:
        return {"enc": "all"}, b""
    if k == 0:
        return {"enc": "none"}, b""
    cands = [({"enc": "bitmap"}, np.packbits(keep_n).tobytes())]
    cands += _encode_set(np.flatnonzero(keep_n))
    if 2 * k > n:
        cands += [({**p, "inv": 1}, b) for p, b in _encode_set(np.flatnonzero(~keep_n))]
    return min(cands, key=lambda c: len(c[1]))


def decode_positions(params: dict, blob: bytes, n: int, k: int) -> np.ndarray:
    """Inverse of :func:`encode_positions` for a mask of ``n`` entries with ``k`` kept."""
    enc = params["enc"]
    if not 0 <= k <= n:
        raise ValueError(f"{k} kept of {n} positions")
    if enc in ("all", "none"):
        if k != (n if enc == "all" else 0) or blob:
            raise ValueError(f"mask coded {enc!r} but {k} of {n} kept")
        return np.full(n, enc == "all")
    if enc == "bitmap":
        if len(blob) != (n + 7) // 8:
            raise ValueError(f"bitmap of {len(blob)} bytes for {n} positions")
        keep = np.unpackbits(np.frombuffer(blob, dtype=np.uint8))[:n].astype(bool)
    else:
        inv = bool(params.get("inv", 0))
        m = n - k if inv else k
        if enc == "rel":
            w, nf = int(params["w"]), int(params["nf"])
            if not 1 <= w <= MAX_WIDTH or not m <= nf <= n:
                raise ValueError(f"bad relative index (w={w}, {nf} fields)")
            fields = ent.unpack_fixed(blob, nf, w)
            step = np.where(fields == 0, (1 << w) - 1, fields)
            pos = (np.cumsum(step) - 1)[fields != 0]
        elif enc == "gaps":
            kk, ns, hb = int(params["k"]), int(params["ns"]), int(params["hb"])
            if not 0 <= kk <= MAX_WIDTH or not m <= ns <= n or not 0 <= hb <= len(blob):
                raise ValueError(f"bad gap stream (k={kk}, {ns} symbols)")
            sym = ent.huffman_decode(blob[:hb], ns)
            real = np.flatnonzero(sym != QUOTIENTS)
            if real.size != m or sym.max(initial=0) > QUOTIENTS:
                raise ValueError(f"gap stream holds {real.size} positions, expected {m}")
            fillers = np.diff(np.cumsum(sym == QUOTIENTS)[real], prepend=0)
            low = ent.unpack_fixed(blob[hb:], m, kk)
            gaps = ((fillers * QUOTIENTS + sym[real]) << kk) + low
            pos = np.cumsum(gaps + 1) - 1
        else:
            raise ValueError(f"unknown position coding {enc!r}")
        if pos.size != m or (m and (pos[-1] >= n or pos[0] < 0)):
            raise ValueError(f"positions run outside the mask's {n} entries")
        keep = np.zeros(n, dtype=bool)
        keep[pos] = True
        if inv:
            keep = ~keep
    if int(np.count_nonzero(keep)) != k:
        raise ValueError(f"mask decodes to {int(np.count_nonzero(keep))} kept entries, expected {k}")
    return keep


def log2_binomial(n: int, k: int) -> float:
    """log2 C(n, k): the bits to name one k-subset of n positions (the unstructured-mask floor)."""
    if k <= 0 or k >= n:
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


# --- levels -------------------------------------------------------------------------------------

@dataclass
class Level:
    """One exact description of a mask: what the kept positions are of, and its extras."""

    kind: str                      # element | unit | pattern
    parts: tuple[int, ...]         # the grid of the positions (shape4 for element)
    keep_n: np.ndarray             # bool, one per unit of ``parts`` (flat, row-major)
    ids: Optional[np.ndarray] = None         # pattern: library row of every kept kernel
    library: Optional[torch.Tensor] = None   # pattern: bool (P, K)
    from_buffer: bool = False                # pattern: the library is the checkpoint's pattern_library

    def floor_bits(self) -> float:
        """log2 C(units, kept) (+ ids' empirical entropy + library bits for patterns)."""
        bits = log2_binomial(self.keep_n.size, int(np.count_nonzero(self.keep_n)))
        if self.kind == "pattern":
            bits += ent.entropy_bits(self.ids) + self.library.numel()
        return bits


def unit_counts(mask4: np.ndarray, parts: tuple[int, ...]) -> np.ndarray:
    """Kept entries per unit of grid ``parts`` (unit-grid shaped; a view, no block copy)."""
    d = mask4.shape
    x8 = mask4.reshape(parts[0], d[0] // parts[0], parts[1], d[1] // parts[1],
                       parts[2], d[2] // parts[2], parts[3], d[3] // parts[3])
    return x8.sum(axis=(1, 3, 5, 7), dtype=np.int64)


def unit_any(mask4: torch.Tensor, parts: tuple[int, ...]) -> torch.Tensor:
    """Unit mask of grid ``parts``: a unit is kept when any of its entries is."""
    return torch.from_numpy(unit_counts(mask4.numpy(), parts) > 0)


def expand(unit_mask: torch.Tensor, shape4: tuple[int, ...]) -> torch.Tensor:
    """A unit mask as an element mask of ``shape4``."""
    G = unit_mask.numel()
    B = math.prod(shape4) // G
    return block_unview(unit_mask.reshape(G, 1).expand(G, B), shape4, tuple(unit_mask.shape))


def levels(mask4: torch.Tensor, structured: Optional[torch.Tensor], library: Optional[torch.Tensor]) -> list[Level]:
    """Every exact description of ``mask4``: element, whole-unit grids, kernel patterns."""
    shape4 = tuple(mask4.shape)
    F, C, R, S = shape4
    m4 = mask4.numpy()
    out = [Level("element", shape4, m4.reshape(-1))]
    kept = int(np.count_nonzero(m4))
    if kept in (0, m4.size):  # nothing to describe: all / none at any level
        return out
    grids = [tuple(structured.shape)] if structured is not None and structured.dim() == 4 else []
    grids += [(F, C, 1, 1), (F, 1, 1, 1), (1, C, 1, 1)]
    for parts in dict.fromkeys(grids):
        if parts == shape4 or any(d % p for d, p in zip(shape4, parts)) or math.prod(parts) == 1:
            continue
        n_U = unit_counts(m4, parts)
        if np.all((n_U == 0) | (n_U == m4.size // n_U.size)):   # every unit kept whole or not at all
            out.append(Level("unit", parts, (n_U > 0).reshape(-1)))
    if 1 < R * S <= 62:
        out.append(_pattern_level(mask4, library))
    return out


def _pattern_level(mask4: torch.Tensor, library: Optional[torch.Tensor]) -> Level:
    F, C, R, S = mask4.shape
    support_NK = mask4.reshape(F * C, R * S)
    alive_N = support_NK.any(1)
    codes = codes_of(support_NK[alive_N])
    from_buffer = False
    lib_codes = None
    if library is not None and library.dim() == 2 and library.shape[1] == R * S and library.shape[0] > 0:
        lib_codes = codes_of(library.bool())
        sorted_codes, order = lib_codes.sort()
        at = torch.searchsorted(sorted_codes, codes).clamp(max=lib_codes.numel() - 1)
        if bool((sorted_codes[at] == codes).all()):
            ids, lib, from_buffer = order[at], library.bool(), True
    if not from_buffer:
        uniq, ids = torch.unique(codes, return_inverse=True)
        lib = library_from_codes(uniq, R * S)
    return Level("pattern", (F, C, 1, 1), alive_N.numpy(), ids.numpy().astype(np.int64), lib, from_buffer)


def encode_level(level: Level) -> tuple[dict, dict[str, bytes]]:
    """(record, blobs) for a level: ``pos`` always; ``ids`` and ``lib`` for patterns."""
    pos_params, pos_blob = encode_positions(level.keep_n)
    rec = {"level": level.kind, "parts": list(level.parts), "kept": int(np.count_nonzero(level.keep_n)),
           "pos": pos_params}
    blobs = {"pos": pos_blob}
    if level.kind == "pattern":
        rec["ids"], blobs["ids"] = ent.encode_ints(level.ids)
        rec["P"], rec["lib_src"] = int(level.library.shape[0]), "buffer" if level.from_buffer else "unique"
        blobs["lib"] = np.packbits(level.library.reshape(-1).numpy()).tobytes()
    return rec, blobs


def decode_level(rec: dict, blobs: dict[str, bytes],
                 shape4: tuple[int, ...]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(mask4, library or None) from :func:`encode_level`'s record and blobs."""
    parts = tuple(int(p) for p in rec["parts"])
    if len(parts) != 4 or any(p < 1 or d % p for d, p in zip(shape4, parts)):
        raise ValueError(f"level grid {list(parts)} does not divide shape {list(shape4)}")
    keep = decode_positions(rec["pos"], blobs["pos"], math.prod(parts), int(rec["kept"]))
    keep_t = torch.from_numpy(keep).reshape(parts)
    kind = rec["level"]
    if kind == "element":
        return keep_t, None
    if kind == "unit":
        return expand(keep_t, shape4), None
    if kind != "pattern":
        raise ValueError(f"unknown mask level {kind!r}")
    F, C, R, S = shape4
    P, K = int(rec["P"]), R * S
    if parts != (F, C, 1, 1) or not 1 <= P or len(blobs["lib"]) != (P * K + 7) // 8:
        raise ValueError(f"bad pattern level (P={P}, {len(blobs['lib'])}-byte library)")
    lib = torch.from_numpy(
        np.unpackbits(np.frombuffer(blobs["lib"], dtype=np.uint8))[: P * K].astype(bool)).reshape(P, K)
    ids = ent.decode_ints(rec["ids"], blobs["ids"], int(rec["kept"]))
    if ids.size and (ids.min() < 0 or ids.max() >= P):
        raise ValueError(f"pattern ids outside a library of {P}")
    support_NK = torch.zeros(F * C, K, dtype=torch.bool)
    support_NK[torch.from_numpy(keep)] = lib[torch.from_numpy(ids)]
    return support_NK.reshape(shape4), lib
