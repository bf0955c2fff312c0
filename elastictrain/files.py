"""Writing files so that a reader never sees half of one, and JSON that ``json.dumps`` accepts."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

_UMASK = os.umask(0)  # read once (it can only be read by setting it), restored at once
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, then rename it over ``path``;
    on any error the temporary file is removed and ``path`` is untouched. The file gets the
    permissions a plain ``open`` would give it (``mkstemp``'s 0600 would hide it from the other
    users of shared storage)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(obj):
    """Non-finite floats become null (JSON has no Infinity); tuples become lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(obj, path: str | Path) -> None:
    """Write JSON atomically (temporary file, fsync, rename): a reader never sees half a report."""
    text = json.dumps(json_safe(obj), indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
