"""Keeping constraint state (masks, pattern libraries, codebooks) identical on every rank.

Masks are a deterministic function of the weights (``topk`` breaks ties by index), so ranks
holding identical weights compute identical masks without talking. Two things still need the wire:
*checking* that this held (a fingerprint per layer — a few bytes, not the masks), and *repairing*
or seeding it (a broadcast of one bit per weight, or of the codebooks' bytes).

Preconditions, as for any collective: every rank calls with the same names, shapes and dtypes;
only the values may differ. The checks raise on *every* rank at once (each rank sees all the
fingerprints), so no rank is left waiting in a later collective.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from elastictrain.distributed import _comm


class RanksDiverged(RuntimeError):
    """Constraint state that must be identical on every rank is not: raised on every rank at once,
    one line naming what differs and where. A launcher reports it and never retries it (a restart
    from the same resume point would diverge the same way)."""


_POW8 = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)  # bit i of a byte ↔ element i


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A bool tensor (any shape, read flat) as uint8, 8 elements a byte, little-endian bit order
    (numpy's ``packbits(bitorder="little")``); the last byte is zero-padded. (⌈n / 8⌉,)"""
    flat = bits.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) * _POW8.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of ``pack_bits``' output as a flat bool tensor: (n,)."""
    if not 0 <= n <= 8 * packed.numel():
        raise ValueError(f"unpack_bits: n = {n} bits, but {packed.numel()} bytes hold at most {8 * packed.numel()}")
    return ((packed.reshape(-1, 1) & _POW8.to(packed.device)) != 0).reshape(-1)[:n]


def _content_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.dtype == torch.bool:  # hash the packed bits: 8× fewer bytes to copy off a GPU and to hash
        t = pack_bits(t)
    return memoryview(t.reshape(-1).contiguous().view(torch.uint8).cpu().numpy())


def state_fingerprints(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One 63-bit content hash per tensor, in sorted-name order: int64 (len(tensors),).

    blake2b (8-byte digest) of the dtype, the shape and the raw bytes: one pass over memory at
    ~1 GB/s on a CPU core, bit-exact (−0.0 and 0.0 differ, as they should for "identical"), and only
    8 bytes a layer ever cross the network. Cheaper than comparing the tensors themselves, which
    would move the whole state.
    """
    out = []
    for name in sorted(tensors):
        t = tensors[name]
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(_content_bytes(t))
        out.append(int.from_bytes(h.digest(), "little") >> 1)  # 63 bits: fits int64, never negative
    return torch.tensor(out, dtype=torch.int64)


def _names_hash(names: list[str]) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(names).encode(), digest_size=8).digest(), "little") >> 1


def check_identical(tensors: dict[str, torch.Tensor], what: str, group=None) -> int:
    """Raise ``RanksDiverged`` on every rank unless every rank holds bitwise-identical ``tensors``.

    The message names the first differing layer (sorted order) and each rank that disagrees with
    rank 0. Two all_gathers: (count, hash of the names), then the fingerprints — the first makes the
    second's shapes safe. Returns the bytes each rank contributed (16 + 8 per tensor).
    """
    names = sorted(tensors)
    fp_N = state_fingerprints(tensors)
    if _comm.world_size(group) == 1:
        return 0
    head_W2 = _comm.all_gather(torch.tensor([len(names), _names_hash(names)], dtype=torch.int64), group)
    if bool((head_W2 != head_W2[0]).any()):
        odd = [r for r in range(head_W2.shape[0]) if not torch.equal(head_W2[r], head_W2[0])]
        raise RanksDiverged(f"{what} differ across ranks: layer names: rank 0 has {int(head_W2[0, 0])} names, "
                           + ", ".join(f"rank {r} has {int(head_W2[r, 0])} other names" for r in odd))
    fp_WN = _comm.all_gather(fp_N, group)
    diff_WN = fp_WN != fp_WN[0]
    bad_N = diff_WN.any(0)
    if bool(bad_N.any()):
        i = int(bad_N.nonzero()[0])
        odd = diff_WN[:, i].nonzero().flatten().tolist()
        raise RanksDiverged(f"{what} differ across ranks: layer {names[i]}: rank 0 has {int(fp_WN[0, i]):016x}, "
                           + ", ".join(f"rank {r} has {int(fp_WN[r, i]):016x}" for r in odd)
                           + f" ({int(bad_N.sum())} of {len(names)} layers differ)")
    return _comm.nbytes(head_W2[0]) + _comm.nbytes(fp_N)


def broadcast_masks(masks: dict[str, torch.Tensor], src: int = 0, group=None) -> int:
    """Overwrite every rank's bool ``masks`` (in place) with rank ``src``'s; returns bytes broadcast.

    All masks travel as one buffer of packed bits (sorted-name order): ⌈Σ numel / 8⌉ bytes, one
    broadcast. ``src`` is a global rank, as in ``torch.distributed.broadcast``.
    """
    names = sorted(masks)
    if any(masks[n].dtype != torch.bool for n in names):
        raise ValueError("broadcast_masks: masks must be bool tensors (got "
                         + ", ".join(f"{n}: {masks[n].dtype}" for n in names if masks[n].dtype != torch.bool) + ")")
    if not names or _comm.world_size(group) == 1:
        return 0
    sizes = [masks[n].numel() for n in names]
    flat = torch.cat([masks[n].reshape(-1) for n in names])
    buf = _comm.broadcast_(pack_bits(flat), src, group)
    if not _is_src(src, group):
        for n, part in zip(names, unpack_bits(buf, sum(sizes)).split(sizes)):
            masks[n].copy_(part.view(masks[n].shape))
    return _comm.nbytes(buf)


def broadcast_tensors(tensors: dict[str, torch.Tensor], src: int = 0, group=None) -> int:
    """Overwrite every rank's ``tensors`` (in place, any dtypes) with rank ``src``'s; returns bytes.

    For codebooks and pattern libraries: their raw bytes concatenated into one uint8 buffer (one
    broadcast, bit-exact for every dtype).
    """
    names = sorted(tensors)
    if not names or _comm.world_size(group) == 1:
        return 0
    parts = [tensors[n].detach().reshape(-1).contiguous().view(torch.uint8) for n in names]
    buf = _comm.broadcast_(torch.cat(parts), src, group)
    if not _is_src(src, group):
        for n, part in zip(names, buf.split([p.numel() for p in parts])):
            t = tensors[n]
            t.detach().copy_(part.clone().view(t.dtype).view(t.shape))  # clone: realign the bytes
    return _comm.nbytes(buf)


def _is_src(src: int, group) -> bool:
    return dist.get_rank() == src  # global rank, like ``src``
