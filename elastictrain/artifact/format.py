"""The ``.etz`` container: a fixed header, zlib-compressed JSON metadata, a binary payload, a CRC.

```
offset  size  field
0       4     magic  b"\\x89ETZ"
4       2     format version, uint16 LE (this release writes and reads 1)
6       4     H = metadata bytes, uint32 LE
10      8     P = payload bytes, uint64 LE
18      H     zlib(JSON metadata): names, shapes, dtypes, chosen encodings, blob [offset, length]s,
              spec, local_dict
18+H    P     payload: the blobs, back to back (each an encoded stream, see masks / layer / entropy)
18+H+P  4     CRC-32 of every byte before it, uint32 LE
```
No pickle: the metadata is JSON, every tensor a blob of bits or raw little-endian values.
Reading checks the length, magic, version and CRC before parsing anything, the metadata's size
once decompressed (``MAX_META``), and every blob reference against the payload; every failure is
a one-line ``ValueError`` naming the file.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from elastictrain.files import atomic_write

MAGIC = b"\x89ETZ"
VERSION = 1
FORMAT = f"elastictrain.etz/{VERSION}"
HEAD = struct.Struct("<4sHIQ")
CRC = struct.Struct("<I")
FIXED_BYTES = HEAD.size + CRC.size
MAX_META = 64 << 20  # decompressed metadata: a real one is ~1 kB per tensor


class Payload:
    """Blobs appended back to back; ``put`` returns a blob's [offset, length] reference."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def put(self, blob: bytes) -> list[int]:
        ref = [self.size, len(blob)]
        if blob:
            self.parts.append(bytes(blob))
            self.size += len(blob)
        return ref


class Blobs:
    """A read payload; ``get`` checks a reference before slicing."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def get(self, ref) -> bytes:
        if (not isinstance(ref, list) or len(ref) != 2 or not all(isinstance(x, int) and x >= 0 for x in ref)
                or ref[0] + ref[1] > len(self.payload)):
            raise ValueError(f"blob reference {ref!r} outside the {len(self.payload)}-byte payload")
        return self.payload[ref[0]:ref[0] + ref[1]]


def json_default(x):
    """JSON for the plain values a checkpoint's local_dict or spec may hold beside dicts and lists."""
    if isinstance(x, (torch.Tensor, np.ndarray, np.generic)) and np.size(x) == 1:
        return x.item()
    if isinstance(x, (tuple, set)):
        return list(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def encode_meta(meta: dict) -> bytes:
    return zlib.compress(json.dumps(meta, separators=(",", ":"), default=json_default).encode(), 9)


def write(path: str | Path, meta: dict, payload: Payload) -> tuple[int, int]:
    """Write atomically (temp file beside ``path``, fsync, rename); returns (file bytes, metadata bytes)."""
    path = Path(path)
    head = encode_meta(meta)
    body = HEAD.pack(MAGIC, VERSION, len(head), payload.size) + head + b"".join(payload.parts)
    data = body + CRC.pack(zlib.crc32(body))
    atomic_write(path, lambda f: f.write(data))
    return len(data), len(head)


def read(path: str | Path) -> tuple[dict, Blobs, int]:
    """(metadata, payload blobs, file bytes); a one-line ValueError naming the file otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the artifact ({e.strerror or type(e).__name__})") from None
    if len(data) < FIXED_BYTES:
        raise ValueError(f"{path}: truncated: {len(data)} bytes, shorter than the {FIXED_BYTES}-byte frame")
    magic, version, h, p = HEAD.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{path}: not an .etz artifact (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ValueError(f"{path}: .etz format version {version} is not supported (this release reads {VERSION})")
    want = HEAD.size + h + p + CRC.size
    if len(data) != want:
        what = "truncated" if len(data) < want else "trailing bytes"
        raise ValueError(f"{path}: {what}: {len(data)} bytes, the header announces {want}")
    (crc,) = CRC.unpack_from(data, want - CRC.size)
    if zlib.crc32(memoryview(data)[: want - CRC.size]) != crc:
        raise ValueError(f"{path}: corrupted: CRC-32 mismatch")
    unzip = zlib.decompressobj()
    try:
        text = unzip.decompress(data[HEAD.size:HEAD.size + h], MAX_META)
        if unzip.unconsumed_tail:
            raise ValueError(f"{path}: metadata expands beyond {MAX_META:,} bytes")
        if not unzip.eof:
            raise zlib.error("incomplete stream")
        meta = json.loads(text)
    except (zlib.error, ValueError, RecursionError) as e:  # (RecursionError: JSON nested too deeply)
        if str(e).startswith(f"{path}: "):
            raise
        raise ValueError(f"{path}: corrupted metadata ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: metadata is not {FORMAT}")
    return meta, Blobs(data[HEAD.size + h:HEAD.size + h + p]), len(data)
