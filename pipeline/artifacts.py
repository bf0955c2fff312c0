"""Small, atomic writers for the JSON a run leaves behind."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def json_safe(obj):
    """Non-finite floats become null (JSON has no Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(obj, path: str | Path) -> None:
    """Write JSON atomically (temporary file, fsync, rename): a reader never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(json_safe(obj), indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
