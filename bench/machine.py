"""Describe the machine a benchmark ran on, for the JSON next to its timings.

``describe()`` returns a plain dict (JSON-serialisable): CPU model, logical cores, torch threads,
total RAM, GPU name (None without CUDA), python/torch/numpy versions and a UTC timestamp. The
hostname is deliberately left out.
"""
from __future__ import annotations

import datetime
import os
import platform


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def describe() -> dict:
    import numpy
    import torch

    ram = _ram_bytes()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "torch_threads": torch.get_num_threads(),
        "ram_total_bytes": ram,
        "ram_total_gib": round(ram / 2**30, 1) if ram else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(describe(), indent=2))
