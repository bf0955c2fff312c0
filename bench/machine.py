"""Describe the machine a benchmark ran on, for the JSON next to its timings.

``describe()`` returns a plain dict (JSON-serialisable): CPU model, logical cores, torch threads,
total RAM, GPU name (None without CUDA), python/torch/numpy versions, load average and a UTC
timestamp. The hostname is deliberately left out. ``cpu_busy()`` samples /proc/stat to tell
whether other processes compete for the cores (on 2 cores this distorts timings several-fold).
"""
from __future__ import annotations

import datetime
import os
import platform
import time


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


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all cores' time spent busy over ``seconds`` (None where /proc/stat is missing)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except OSError:
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


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
        "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(describe(), indent=2))


def write_result(result: dict, out) -> None:
    """The benchmark's JSON (with ``describe()`` inside), and where it went."""
    import json
    from pathlib import Path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def write_with_table(result: dict, args, name: str, note: str, md: str):
    """The JSON at ``out_path``, and — for a full run — ``note`` and the Markdown table ``md`` beside
    it (NAME.md); returns the JSON's path."""
    from pathlib import Path

    out = Path(out_path(args, name))
    write_result(result, out)
    if not args.quick:
        out.with_suffix(".md").write_text(note + "\n\n" + md + "\n")
    return out


def spawn_two(worker, *args, out) -> list:
    """Run ``worker(rank, port, *args, rows_path)`` on two processes (loopback port); rank 0
    writes its rows as JSON to ``rows_path``, which this returns."""
    import json
    import socket
    from pathlib import Path

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows_path = Path(out).with_suffix(".rows.tmp")
    mp.spawn(worker, args=(port, *args, str(rows_path)), nprocs=2, join=True)
    rows = json.loads(rows_path.read_text())
    rows_path.unlink()
    return rows


def add_quick(ap, name: str, help: str) -> None:
    """``--quick`` (a short run of about a minute) and ``--out`` (default results/NAME.json, or
    NAME-quick.json with --quick, so a quick run never overwrites the full figures)."""
    ap.add_argument("--quick", action="store_true", help=help + "; prints its JSON as the last line")
    ap.add_argument("--out", default=None, help=f"default bench/results/{name}.json ({name}-quick.json with --quick)")


def out_path(args, name: str):
    from pathlib import Path

    file = f"{name}-quick.json" if args.quick else f"{name}.json"
    return args.out or str(Path(__file__).resolve().parent / "results" / file)


def finish(result: dict, args, name: str) -> dict:
    """Write the JSON; with --quick also print it (without the machine block) as the last line."""
    import json

    write_result(result, out_path(args, name))
    if args.quick:
        print(json.dumps({k: v for k, v in result.items() if k != "machine"}, default=str))
    return result


def interleaved_ms(calls: dict, x, warmup: int, runs: int, block: int = 5) -> dict[str, float]:
    """Median ms of each of ``calls`` (name -> function of ``x``) over ``runs`` timed calls, the
    variants INTERLEAVED in blocks: after each one's ``warmup``, every round runs each variant (in a
    rotating order) for one untimed call and then ``block`` timed ones. A drift of the machine
    (frequency, a neighbour's load) so hits every variant alike rather than whichever ran during
    it, and the untimed call absorbs the switch between variants."""
    import statistics

    times = {v: [] for v in calls}
    for fn in calls.values():
        for _ in range(warmup):
            fn(x)
    order = list(calls)
    for i in range(-(-runs // block)):
        for v in order[i % len(order):] + order[:i % len(order)]:
            calls[v](x)
            for _ in range(min(block, runs - i * block)):
                t0 = time.perf_counter()
                calls[v](x)
                times[v].append(time.perf_counter() - t0)
    return {v: 1000 * statistics.median(t) for v, t in times.items()}
