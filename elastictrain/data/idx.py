"""Read IDX files, the format of MNIST and Fashion-MNIST, plain or gzip-compressed.

An IDX file is a header followed by a dense big-endian array::

    bytes 0-1   0x00 0x00                 (magic)
    byte  2     dtype code                (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                                           0x0D float32, 0x0E float64)
    byte  3     number of dimensions d
    4*d bytes   each dimension, uint32 big-endian
    the data    prod(dims) values, row-major, big-endian

Every inconsistency (bad magic, unknown dtype, truncated or over-long data, a broken gzip stream)
is one ``ValueError`` naming the file, so a half-downloaded data set fails at load with the file's
name instead of later as a shape error.
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

# dtype code -> big-endian numpy dtype of the values on disk
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it is a gzip file (detected by its magic, not its name)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:  # truncated stream, bad CRC, bad header
        raise ValueError(f"{path}: not a valid gzip file ({e})") from None


def parse_idx(data: bytes, name: str) -> torch.Tensor:
    """Decode the bytes of one IDX file; ``name`` is only used in error messages."""
    if len(data) < 4:
        raise ValueError(f"{name}: not an IDX file (only {len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{name}: not an IDX file (magic starts {data[:2].hex()}, expected 0000)")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise ValueError(f"{name}: unknown IDX dtype code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header})")
    dims = [int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4)]
    dtype = _DTYPES[code]
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes"
        raise ValueError(f"{name}: {what}: IDX header {dims} of {dtype.name} needs {expected} bytes, "
                         f"file has {len(data)}")
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    # torch has no big-endian dtypes: convert to native order (a no-op copy for single bytes)
    return torch.from_numpy(values.astype(dtype.newbyteorder("="), copy=True))


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file (``.gz`` or plain) into a tensor of its dtype and shape."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))
