"""Where the projection's time goes, measured on the library's own code path.

``elastictrain.constraints.projection.project`` labels its stages with ``torch.profiler.record_function``
(``elastictrain.constraints.pattern``, ``elastictrain.prune``, ``elastictrain.quantize``); this runs the real
``project()`` under the CPU profiler and sums each label's wall time. The profiler adds a little
overhead, so the stages are reported as shares of the profiled run's wall time.
"""
from __future__ import annotations

import statistics
import time

from torch.profiler import ProfilerActivity, profile

from elastictrain.constraints.projection import project

STAGES = [
    ("elastictrain.pattern", "pattern library fit (top-entries votes) + best-pattern assignment"),
    ("elastictrain.prune", "unit scores + (balanced / global) top-k selection + mask expansion"),
    ("elastictrain.quantize", "pack kept weights, k-means / uniform fit, nearest-value assignment"),
]


def breakdown(weights, plans, repeats: int, libraries=None) -> dict:
    runs = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            project(weights, plans, libraries)
            wall = time.perf_counter() - t0
        stage = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in dict(STAGES)}
        runs.append((wall, stage))
    med = {k: statistics.median(r[1].get(k, 0.0) for r in runs) for k, _ in STAGES}
    wall = statistics.median(r[0] for r in runs)
    med["other"] = max(wall - sum(med.values()), 0.0)
    return {"profiled_wall_median_s": wall, "stages_median_s": med}


def print_table(bd: dict) -> None:
    wall = bd["profiled_wall_median_s"]
    print("| stage | seconds | share | what |")
    print("|---|---:|---:|---|")
    for key, what in STAGES + [("other", "as4d / dtype, masking, block views, output casts")]:
        s = bd["stages_median_s"][key]
        print(f"| {key} | {s:.3f} | {s / wall:.0%} | {what} |")
    print(f"| profiled wall | {wall:.3f} | 100% | |")
