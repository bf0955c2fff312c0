"""Read the CIFAR-10 / CIFAR-100 "python version" folders without trusting pickle.

The official archives (the folders torchvision's ``CIFAR10(download=False)`` reads) are Python 2
pickles of plain dicts: ``b'data'`` a uint8 ``N×3072`` numpy array (the R, G and B 32×32 planes,
row-major) and ``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100) a list of ints. Loading a
pickle runs whatever callables it names, so a tampered file in a shared data directory would run
code on every rank of a job. :class:`SafeUnpickler` resolves only the handful of globals those
files need (numpy's array reconstruction and the byte-string helpers) and refuses every other one
before anything is called.
"""
from __future__ import annotations

import _codecs
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # numpy >= 2 moved the array reconstruction to numpy._core (numpy.core is a warning shim)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]



@dataclass(frozen=True, slots=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and labels."""

    folder: str
    """subfolder of the data root that the official archive unpacks to."""
    train: tuple[str, ...]
    """training batch files, in order."""
    test: tuple[str, ...]
    """test batch files."""
    label_key: bytes
    """dict key of the labels (CIFAR-100: the 100 fine classes, not the 20 coarse ones)."""
    num_classes: int


LAYOUTS = {
    "cifar10": CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                           b"labels", 10),
    "cifar100": CifarLayout("cifar-100-python", ("train",), ("test",), b"fine_labels", 100),
}

# (module, name) as written in the pickle -> the object it stands for. Nothing is imported by name,
# so no other module can be reached, whatever the file says.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,   # files written with numpy < 2
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # files written with numpy >= 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3 writes bytes as _codecs.encode(str, 'latin1') at protocols <= 2, and b'' as bytes()
    ("_codecs", "encode"): _codecs.encode,
    ("__builtin__", "bytes"): bytes,
    ("builtins", "bytes"): bytes,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a CIFAR batch file needs."""

    def __init__(self, file, name: str) -> None:
        super().__init__(file, encoding="bytes")  # as the originals: Python 2 str -> bytes
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ValueError(f"{self._name}: refusing to load {module}.{name} "
                             "(not a CIFAR batch file, or tampered with)") from None


def safe_load(path: str | Path) -> Any:
    """Unpickle one file with :class:`SafeUnpickler`; any failure is a ValueError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, str(path)).load()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # a refused global, a truncated stream, garbage opcodes, bad numpy state
        if isinstance(e, ValueError) and str(e).startswith(f"{path}: "):
            raise
        raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


def read_batch(path: str | Path, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch file -> (images uint8 N×3×32×32, labels int64 N), checking what it holds."""
    batch = safe_load(path)
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, found {type(batch).__name__}")
    data, labels = batch.get(b"data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be a uint8 N×3072 array, found {got}")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        n = len(labels) if isinstance(labels, (list, np.ndarray)) else type(labels).__name__
        raise ValueError(f"{path}: {label_key!r} must be a list of {len(data)} labels, found {n}")
    try:
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{path}: {label_key!r} holds non-integer labels") from None
    x = np.ascontiguousarray(data).reshape(-1, 3, 32, 32)
    if not x.flags.writeable:  # an array viewing the pickle's bytes: torch wants its own memory
        x = x.copy()
    return torch.from_numpy(x), y


def read_batches(paths: list[Path], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate several batch files in order (CIFAR-10's five training batches)."""
    parts = [read_batch(p, label_key) for p in paths]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
