"""Small, atomic writers for the JSON a run leaves behind."""
from __future__ import annotations

import json
from pathlib import Path

from elastictrain.files import atomic_write, json_safe  # noqa: F401  (json_safe: re-exported)


def write_json(obj, path: str | Path) -> None:
    """Write JSON atomically (temporary file, fsync, rename): a reader never sees half a report."""
    text = json.dumps(json_safe(obj), indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
