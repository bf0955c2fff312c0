"""Checkpoints: one plain dict of tensors and plain values, shaped like the seed's, written
atomically and read with ``torch.load(..., weights_only=True)``.

Every file written here gets a content hash beside it (``NAME.sha256``: hex digest and size),
written after the file itself; ``load`` checks it, so a truncated or corrupted checkpoint is named
rather than half-read. A file without its hash (written by another tool, or cut off between the
two renames) still loads: the unpickler is the last line of defence, never the only one.

```
{format, model_state_dict,                      # effective weights: compression baked in
 elastic_trainer_state_dict: {model_buffers_state_dict: {
     weight_mask, pre_weight_mask,              # {param: bool tensor, the param's shape}
     structured_weight_mask, pre_structured_weight_mask,   # {param: bool, unit-grid shape}
     quantization_table,                        # {param: (groups, 2^bits) codebook}
     pattern_library}},                         # {param: bool (patterns, R*S)}
 local_dict: {epoch, ...}, spec: {...plain spec...},
 couplings: [[weight names], ...]}              # coupled filter pruning: the model's channel groups
```
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Optional

import torch

from elastictrain.config import ConfigError
from elastictrain.constraints.grid import as4d
from elastictrain.constraints.plan import LayerPlan, layer_kind, resolve
from elastictrain.constraints.projection import LayerState
from elastictrain.constraints.spec import Quantize
from elastictrain.constraints.spec import parse as parse_spec
from elastictrain.files import atomic_write

FORMAT = "elastictrain.checkpoint/1"
BUFFER_KEYS = ("weight_mask", "pre_weight_mask", "structured_weight_mask", "pre_structured_weight_mask",
               "quantization_table", "pattern_library")


def _hash_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_save(obj: Any, path: str | Path) -> str:
    """torch.save to a temporary file beside ``path``, fsync, rename over it, then record its
    SHA-256 in ``path.sha256`` (also atomically). Returns the digest."""
    path = Path(path)
    _hash_path(path).unlink(missing_ok=True)  # never a stale hash beside a new file
    atomic_write(path, lambda f: torch.save(obj, f))
    digest = file_digest(path)
    line = f"{digest}  {path.stat().st_size}\n".encode()
    atomic_write(_hash_path(path), lambda f: f.write(line))
    return digest


def check_digest(path: str | Path) -> None:
    """Raise ``ConfigError`` naming ``path`` when its recorded hash or size does not match."""
    path = Path(path)
    hp = _hash_path(path)
    if not hp.is_file():
        return
    try:
        digest, size = hp.read_text().split()
        size = int(size)
    except ValueError:
        raise ConfigError(f"{hp}: unreadable content hash") from None
    actual = path.stat().st_size
    if actual != size:
        raise ConfigError(f"{path}: truncated or corrupted ({actual} bytes, {size} when written; "
                          f"if you rewrote it on purpose, delete {hp.name})")
    if file_digest(path) != digest:
        raise ConfigError(f"{path}: corrupted (SHA-256 differs from the one recorded when it was written; "
                          f"if you rewrote it on purpose, delete {hp.name})")


class UnsafeCheckpoint(ConfigError):
    """A file that names Python callables for the unpickler to run: refused, and never taken for a
    merely corrupted checkpoint that a rerun may overwrite (it is evidence of tampering)."""


def _unsafe_globals(path: Path) -> list[str]:
    """The globals outside torch's weights-only allowlist that the file's pickle names (read from
    its opcodes, nothing executed); [] when there are none or the file cannot be scanned."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return []


def load(path: str | Path) -> dict:
    """A checkpoint dict or a plain state dict, loaded with ``weights_only=True`` after its
    content hash (when recorded) is checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint")
    check_digest(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused or a corrupt file: one line, naming the file
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UnsafeCheckpoint(f"{path}: not a readable checkpoint: unpickling it would call "
                                   f"{', '.join(unsafe[:3])} "
                                   "(refused, nothing ran; a checkpoint holds only tensors and plain values)") from None
        raise ConfigError(f"{path}: not a readable checkpoint "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    return obj


def model_state(ckpt: dict, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    sd = ckpt.get("model_state_dict", ckpt)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{source}: holds no model_state_dict of tensors")
    return sd


def buffers(ckpt: dict) -> dict[str, dict[str, torch.Tensor]]:
    b = ckpt.get("elastic_trainer_state_dict", {}).get("model_buffers_state_dict", {})
    return {k: dict(b.get(k, {})) for k in BUFFER_KEYS}


def plans(ckpt: dict, source: str = "checkpoint", *, from_tables: bool = True) -> dict[str, LayerPlan]:
    """The plans a checkpoint's weights were made under — the one way to rebuild them: the
    recorded spec resolved against the weights' shapes (a spec that does not resolve is a
    ``ConfigError`` naming ``source``). Without a spec (the research release's checkpoints) and
    with ``from_tables``: one codebook per row of each quantization table, bits = log2(levels),
    so accounting still counts code bits; else {}. A coupled spec is resolved with the channel groups
    the stage recorded (``couplings``)."""
    sd = model_state(ckpt, source)
    shapes = {k: tuple(v.shape) for k, v in sd.items() if torch.is_floating_point(v)}
    if isinstance(ckpt.get("spec"), dict):
        try:
            return resolve(parse_spec(ckpt["spec"]), shapes, f"{source}: spec", ckpt.get("couplings"))
        except (ValueError, TypeError, KeyError) as e:  # (ConfigError is a ValueError)
            raise ConfigError(str(e) if isinstance(e, ConfigError) else f"{source}: spec: {e}") from None
    if not from_tables:
        return {}
    out = {}
    for name, table in buffers(ckpt)["quantization_table"].items():
        if name not in shapes or layer_kind(shapes[name]) is None or table.dim() != 2:
            continue
        bits = max(1, math.ceil(math.log2(max(table.shape[1], 2))))
        shape4 = tuple(as4d(torch.empty(shapes[name], device="meta")).shape)
        out[name] = LayerPlan(name, -1, layer_kind(shapes[name]), shapes[name], shape4,
                              quantize=Quantize(bits=bits), quant_parts=(table.shape[0], 1, 1, 1))
    return out


def compressed_checkpoint(weights: dict[str, torch.Tensor], states: dict[str, LayerState], spec: dict,
                          previous: Optional[dict] = None, epoch: int = 0, extra: Optional[dict] = None) -> dict:
    """The seed-shaped checkpoint for projected ``weights`` and their per-layer ``states``."""
    prev = buffers(previous) if previous else {k: {} for k in BUFFER_KEYS}
    mb = {k: {} for k in BUFFER_KEYS}
    for name, st in states.items():
        mb["weight_mask"][name] = st.mask.clone()
        mb["pre_weight_mask"][name] = prev["weight_mask"].get(name, torch.ones_like(st.mask))
        structured = [m for m in st.unit_masks if m is not None]
        if structured:
            mb["structured_weight_mask"][name] = structured[-1].clone()
            mb["pre_structured_weight_mask"][name] = prev["structured_weight_mask"].get(
                name, torch.ones_like(structured[-1]))
        if st.codebook is not None:
            mb["quantization_table"][name] = st.codebook.clone()
        if st.library is not None:
            mb["pattern_library"][name] = st.library.clone()
    return {
        "format": FORMAT,
        "model_state_dict": {k: v.detach().clone() for k, v in weights.items()},
        "elastic_trainer_state_dict": {"model_buffers_state_dict": mb},
        "local_dict": {"epoch": epoch},
        "spec": spec,
        **(extra or {}),
    }
