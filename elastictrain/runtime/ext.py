"""The compiled kernels of the runtime, built once per machine from ``csrc/`` and cached.

``make setup`` builds them (``ext.main()``); at run time ``kernels()``
loads the cached build, or builds it if the cache is missing, or returns ``None`` with the reason
in ``unavailable()`` when no compiler is present — the runtime then uses its pure-torch paths.
The build goes to ``$ELASTICTRAIN_CACHE`` (default ``~/.cache/elastictrain``), in a folder named
after a hash of the sources and the torch version, so a changed source or torch rebuilds.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import torch

SOURCES = [Path(__file__).with_name("csrc") / "kernel_conv.cpp"]
_loaded: dict = {}


def build_dir() -> Path:
    h = hashlib.sha256(torch.__version__.encode())
    for s in SOURCES:
        h.update(s.read_bytes())
    root = Path(os.environ.get("ELASTICTRAIN_CACHE", Path.home() / ".cache" / "elastictrain"))
    return root / f"ext-{h.hexdigest()[:16]}"


def kernels(verbose: bool = False):
    """The compiled module (``csr_conv``), or ``None`` when it cannot be built here."""
    if "module" not in _loaded:
        try:
            from torch.utils.cpp_extension import load

            d = build_dir()
            d.mkdir(parents=True, exist_ok=True)
            _loaded["module"] = load(name="elastictrain_kernels", sources=[str(s) for s in SOURCES],
                                     build_directory=str(d), verbose=verbose,
                                     extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception as e:  # no compiler, no ninja, a failed build: the torch paths remain
            _loaded["module"], _loaded["why"] = None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    return _loaded["module"]


def unavailable() -> Optional[str]:
    """Why ``kernels()`` is ``None`` (after it was called), else ``None``."""
    return _loaded.get("why")


def main() -> None:
    """Build (or find) the kernels and say where: ``make setup`` runs this."""
    where = f"built in {build_dir()}" if kernels() is not None else f"unavailable: {unavailable()}"
    print(f"elastictrain kernels: {where}")
