"""Bit packing and a canonical Huffman coder for small-alphabet integer streams.

Why Huffman and not rANS: the streams here are gap quotients (after a Rice-style split, a few
dozen symbols) and 1–8-bit codebook codes; a prefix code is within a fraction of a bit of their
empirical entropy, its table is a nibble per symbol, and both directions vectorise with numpy
(encoding entirely; decoding except one bounded pass that follows codeword starts).

Streams are MSB-first bit strings padded to whole bytes. A Huffman blob is
``varint(A) · A code lengths as nibbles · bit string`` (A = alphabet size = largest symbol + 1;
length 0 = symbol absent). A single present symbol costs no bits per occurrence. Code lengths are
limited to ``MAX_LEN`` by flattening the frequencies (halve, keep ≥ 1) until the tree fits.
Integer streams (:func:`encode_ints`) take the smallest of packed-at-width and Huffman over
single symbols or blocks of up to 4 (2-bit codes in blocks of 3: 1.94 bits a code where the
entropy is 1.93 and single-symbol Huffman 2.00).

Every decoder checks lengths against the bytes it was given and raises ``ValueError`` (the caller
adds the file and the tensor); it never reads past its blob and loops at most ``n`` times.
Legend: n = symbols in a stream, A = alphabet size, L = longest code length.
"""
from __future__ import annotations

import heapq
from typing import Union

import numpy as np

MAX_LEN = 15          # longest Huffman code (a nibble); windows of MAX_LEN + 7 bits fit in 3 bytes
MAX_ALPHABET = 1 << 15


# --- varints ------------------------------------------------------------------------------------

def varint(x: int) -> bytes:
    out = bytearray()
    while True:
        b, x = x & 0x7F, x >> 7
        out.append(b | (0x80 if x else 0))
        if not x:
            return bytes(out)


def read_varint(buf: bytes, at: int = 0) -> tuple[int, int]:
    """(value, position after it); refuses more than 8 bytes (values < 2^56)."""
    x = 0
    for i in range(8):
        if at + i >= len(buf):
            raise ValueError("varint runs past the end of its stream")
        b = buf[at + i]
        x |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return x, at + i + 1
    raise ValueError("varint longer than 8 bytes")


# --- bit packing --------------------------------------------------------------------------------

def pack_bits(values: np.ndarray, widths: Union[np.ndarray, int]) -> bytes:
    """Concatenate ``values[i]`` written in ``widths[i]`` bits, MSB first, padded to bytes."""
    v_n = np.asarray(values, dtype=np.int64).reshape(-1)
    if np.isscalar(widths) or np.ndim(widths) == 0:
        w = int(widths)
        if w == 0 or v_n.size == 0:
            return b""
        bits_nw = (v_n[:, None] >> np.arange(w - 1, -1, -1, dtype=np.int64)) & 1
        return np.packbits(bits_nw.astype(np.uint8).reshape(-1)).tobytes()
    w_n = np.asarray(widths, dtype=np.int64).reshape(-1)
    total = int(w_n.sum())
    if total == 0:
        return b""
    owner_t = np.repeat(np.arange(v_n.size), w_n)                  # which value each bit belongs to
    start_n = np.cumsum(w_n) - w_n
    shift_t = w_n[owner_t] - 1 - (np.arange(total) - start_n[owner_t])
    bits_t = (v_n[owner_t] >> shift_t) & 1
    return np.packbits(bits_t.astype(np.uint8)).tobytes()


def unpack_fixed(buf: bytes, n: int, width: int) -> np.ndarray:
    """Inverse of ``pack_bits(values, width)`` for ``n`` values: int64 (n,)."""
    if n < 0 or width < 0 or width > 62:
        raise ValueError(f"bad packed stream shape (n={n}, width={width})")
    if width == 0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    need = (n * width + 7) // 8
    if len(buf) != need:
        raise ValueError(f"packed stream holds {len(buf)} bytes, {n} values × {width} bits need {need}")
    bits_nw = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))[: n * width].reshape(n, width)
    return (bits_nw.astype(np.int64) << np.arange(width - 1, -1, -1, dtype=np.int64)).sum(1)


def width_of(x: np.ndarray) -> int:
    """Bits needed for the largest value of a non-negative stream (0 for an empty or all-zero one)."""
    return int(x.max()).bit_length() if x.size else 0


# --- canonical Huffman --------------------------------------------------------------------------

def _tree_lengths(freq_A: np.ndarray) -> np.ndarray:
    """Huffman code lengths (0 for absent symbols); deterministic tie-breaks."""
    lens = np.zeros(freq_A.size, dtype=np.int64)
    present = np.flatnonzero(freq_A)
    if present.size == 1:
        lens[present] = 1
        return lens
    heap = [(int(freq_A[s]), int(s), [int(s)]) for s in present]
    heapq.heapify(heap)
    while len(heap) > 1:  # loops over the alphabet (≤ a few hundred symbols), not the stream
        fa, ta, a = heapq.heappop(heap)
        fb, tb, b = heapq.heappop(heap)
        lens[a + b] += 1
        heapq.heappush(heap, (fa + fb, min(ta, tb), a + b))
    return lens


def code_lengths(freq_A: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Length-limited Huffman code lengths for symbol frequencies ``freq_A``."""
    f = np.asarray(freq_A, dtype=np.int64).copy()
    if f.size > MAX_ALPHABET:
        raise ValueError(f"alphabet of {f.size} symbols exceeds {MAX_ALPHABET}")
    while True:
        lens = _tree_lengths(f)
        if lens.max(initial=0) <= max_len:
            return lens
        f = np.where(f > 0, (f >> 1) | 1, 0)


def canonical_codes(lens_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical codes for lengths: (codes_A, symbols in canonical order)."""
    present = np.flatnonzero(lens_A)
    order = present[np.lexsort((present, lens_A[present]))]
    codes = np.zeros(lens_A.size, dtype=np.int64)
    code, prev = 0, int(lens_A[order[0]]) if order.size else 0
    for s in order:  # over the alphabet
        l = int(lens_A[s])
        code <<= l - prev
        codes[s], code, prev = code, code + 1, l
    return codes, order


def huffman_bits(freq_A: np.ndarray) -> int:
    """Size in bits of ``huffman_encode`` for a stream with these symbol frequencies (header incl.)."""
    lens = code_lengths(freq_A)
    A = int(np.flatnonzero(freq_A).max()) + 1 if freq_A.any() else 0
    if A == 0:
        return 0
    body = 0 if np.count_nonzero(lens) == 1 else int((freq_A * lens).sum())
    return 8 * (len(varint(A)) + (A + 1) // 2) + ((body + 7) // 8) * 8


def huffman_encode(sym_n: np.ndarray) -> bytes:
    """A Huffman blob (module doc) for a stream of non-negative ints."""
    sym_n = np.asarray(sym_n, dtype=np.int64).reshape(-1)
    if sym_n.size == 0:
        return b""
    if sym_n.min() < 0:
        raise ValueError("Huffman streams hold non-negative symbols")
    freq = np.bincount(sym_n)
    lens = code_lengths(freq)
    A = freq.size
    nib = np.zeros(A + (A & 1), dtype=np.uint8)
    nib[:A] = lens
    head = varint(A) + ((nib[0::2] << 4) | nib[1::2]).astype(np.uint8).tobytes()
    if np.count_nonzero(lens) == 1:
        return head
    codes, _ = canonical_codes(lens)
    return head + pack_bits(codes[sym_n], lens[sym_n])


def huffman_decode(buf: bytes, n: int) -> np.ndarray:
    """Inverse of :func:`huffman_encode`: ``n`` symbols, int64 (n,)."""
    if n == 0:
        if buf:
            raise ValueError(f"empty Huffman stream carries {len(buf)} bytes")
        return np.zeros(0, dtype=np.int64)
    A, at = read_varint(buf)
    if not 1 <= A <= MAX_ALPHABET or at + (A + 1) // 2 > len(buf):
        raise ValueError(f"Huffman table of {A} symbols does not fit its {len(buf)}-byte stream")
    nib = np.frombuffer(buf, dtype=np.uint8, count=(A + 1) // 2, offset=at)
    lens = np.stack([nib >> 4, nib & 15], 1).reshape(-1)[:A].astype(np.int64)
    body = buf[at + (A + 1) // 2:]
    present = np.flatnonzero(lens)
    if present.size == 1:
        if body:
            raise ValueError("single-symbol Huffman stream carries code bits")
        return np.full(n, present[0], dtype=np.int64)
    L = int(lens.max(initial=0))
    if present.size == 0 or int((1 << (L - lens[present])).sum()) != 1 << L:
        raise ValueError("Huffman code lengths do not form a complete prefix code")
    nbits = 8 * len(body)
    if n > nbits:
        raise ValueError(f"Huffman stream of {nbits} bits cannot hold {n} symbols")
    codes, order = canonical_codes(lens)
    # decode table over L-bit windows: canonical codes tile [0, 2^L) in canonical order
    span = 1 << (L - lens[order])
    tab_sym = np.repeat(order, span)
    tab_len = np.repeat(lens[order], span)
    # the codeword that would start at every bit position p, and where the next one starts
    b = np.frombuffer(body + b"\0\0\0", dtype=np.uint8).astype(np.int64)
    p = np.arange(nbits, dtype=np.int64)
    v24 = (b[p >> 3] << 16) | (b[(p >> 3) + 1] << 8) | b[(p >> 3) + 2]
    win = (v24 >> (24 - L - (p & 7))) & ((1 << L) - 1)
    nxt = (p + tab_len[win]).tolist() + [nbits + 1]  # sentinel: a run off the end stays there
    starts = [0] * n
    pos = 0
    for i in range(n):  # follows codeword starts: n steps, each O(1)
        starts[i] = pos
        pos = nxt[min(pos, nbits)]
    if starts[-1] >= nbits or pos > nbits:
        raise ValueError(f"Huffman stream truncated ({nbits} bits for {n} symbols)")
    return tab_sym[win[np.asarray(starts, dtype=np.int64)]]


# --- integer streams: the smaller of packed and Huffman ----------------------------------------

MAX_BLOCK_ALPHABET = 1 << 10  # Huffman over blocks of t symbols: at most this many block symbols


def _blocks(x_n: np.ndarray, base: int, t: int) -> np.ndarray:
    """Consecutive t-tuples of a stream (zero-padded) as one symbol each, first symbol most significant."""
    pad = np.zeros(-x_n.size % t, dtype=np.int64)
    x_mt = np.concatenate([x_n, pad]).reshape(-1, t)
    return (x_mt * base ** np.arange(t - 1, -1, -1, dtype=np.int64)).sum(1)


def encode_ints(x_n: np.ndarray) -> tuple[dict, bytes]:
    """The cheapest of: ``arange`` (x == 0..n-1, no bytes), ``packed`` at the width of the largest
    value, ``huffman`` over single symbols or over blocks of t symbols (t ≤ 4; a small alphabet's
    prefix code then gets closer to the entropy). Returns (params, blob)."""
    x_n = np.asarray(x_n, dtype=np.int64).reshape(-1)
    if x_n.size and np.array_equal(x_n, np.arange(x_n.size)):
        return {"enc": "arange"}, b""
    w = width_of(x_n)
    best = ({"enc": "packed", "w": w}, 8 * ((x_n.size * w + 7) // 8))
    base = int(x_n.max()) + 1 if x_n.size else 1
    for t in range(1, 5):
        if x_n.size == 0 or base ** t > (MAX_ALPHABET if t == 1 else MAX_BLOCK_ALPHABET) or (t > 1 and base == 1):
            break
        bits = huffman_bits(np.bincount(_blocks(x_n, base, t)))
        if bits < best[1]:
            best = ({"enc": "huffman", "t": t, "base": base}, bits)
    params = best[0]
    if params["enc"] == "packed":
        return params, pack_bits(x_n, w)
    return params, huffman_encode(_blocks(x_n, params["base"], params["t"]))


def decode_ints(params: dict, blob: bytes, n: int) -> np.ndarray:
    enc = params["enc"]
    if enc == "arange":
        return np.arange(n, dtype=np.int64)
    if enc == "packed":
        return unpack_fixed(blob, n, int(params["w"]))
    if enc == "huffman":
        t, base = int(params["t"]), int(params["base"])
        if not (1 <= t <= 4 and 1 <= base and base ** t <= MAX_ALPHABET):
            raise ValueError(f"bad Huffman block parameters t={t}, base={base}")
        s_m = huffman_decode(blob, -(-n // t))
        if s_m.size and s_m.max() >= base ** t:
            raise ValueError("Huffman block symbol out of range")
        digits_mt = (s_m[:, None] // base ** np.arange(t - 1, -1, -1, dtype=np.int64)) % base
        return digits_mt.reshape(-1)[:n]
    raise ValueError(f"unknown integer stream encoding {enc!r}")


def entropy_bits(x_n: np.ndarray) -> float:
    """n × empirical entropy of a stream (bits): the floor for an i.i.d. code of its symbols."""
    x_n = np.asarray(x_n, dtype=np.int64).reshape(-1)
    if x_n.size == 0:
        return 0.0
    c = np.bincount(x_n)
    c = c[c > 0].astype(np.float64)
    return float(-(c * np.log2(c / x_n.size)).sum())
