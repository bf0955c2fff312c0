"""Medians over seeds of bench/peers.py's results: what the README and the closing notes quote.

Run from the repository root after ``bench/peers.py`` at several seeds:

    .venv/bin/python bench/peers_summary.py [--files peers.json,peers-seed1.json,peers-seed2.json]

For every (ratio, method) the median final top-1 over the seeds that ran it, each seed's figure,
and the margin of each ElasticTrain row over the plain script's median at the same ratio. Rows a
seed did not run (seed 0 alone runs distillation, the plain script with ElasticTrain's recipe and
torchao) are medians of fewer seeds, and say so. Writes bench/results/peers-summary.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
PLAIN = "plain PyTorch (torch.nn.utils.prune)"


def summarize(files: list[Path]) -> dict:
    runs = [json.loads(f.read_text()) for f in files]
    by: dict[tuple, dict[int, float]] = {}
    for run in runs:
        for r in run["rows"]:
            by.setdefault((r["ratio"], r["method"]), {})[run["seed"]] = r["top1"]
    rows = []
    for (ratio, method), seeds in by.items():
        rows.append({"ratio": ratio, "method": method, "median_top1": statistics.median(seeds.values()),
                     "seeds": {str(s): v for s, v in sorted(seeds.items())}})
    plain = {r["ratio"]: r["median_top1"] for r in rows if r["method"] == PLAIN}
    for r in rows:
        if r["method"] != PLAIN and r["ratio"] in plain:
            r["margin_over_plain_pp"] = 100 * (r["median_top1"] - plain[r["ratio"]])
    return {"benchmark": "peers-summary", "files": [f.name for f in files],
            "epochs": {"dense": runs[0]["dense_epochs"], "prune": runs[0]["prune_epochs"]}, "rows": rows}


def markdown(s: dict) -> str:
    lines = [f"Medians over seeds of {', '.join(s['files'])} (SmallCNN, Fashion-MNIST, {s['epochs']['dense']} dense + "
             f"{s['epochs']['prune']} pruning epochs)", "",
             "| ratio | method | median top-1 | seeds | vs plain script (median) |", "|---:|---|---:|---|---:|"]
    for r in s["rows"]:
        seeds = ", ".join(f"{k}: {100 * v:.2f}%" for k, v in r["seeds"].items())
        margin = r.get("margin_over_plain_pp")
        lines.append(f"| {r['ratio']:g}× | {r['method']} | {100 * r['median_top1']:.2f}% | {seeds} | "
                     + ("—" if margin is None else f"{margin:+.2f} pp") + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", default="peers.json,peers-seed1.json,peers-seed2.json")
    a = ap.parse_args()
    files = [RESULTS / f for f in a.files.split(",")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        ap.error(f"--files: missing {', '.join(missing)} (run bench/peers.py --seed N first)")
    s = summarize(files)
    md = markdown(s)
    (RESULTS / "peers-summary.json").write_text(json.dumps(s, indent=2) + "\n")
    (RESULTS / "peers-summary.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
