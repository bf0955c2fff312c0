"""Benchmark: ElasticTrain against a plain PyTorch pruning script, side by side, one process each.

Run from the repository root:

    .venv/bin/python bench/peers.py [--ratios 50,200] [--seed 0] [--variants magnitude,kd] [--peers torchao]
                                    [--plain-ours] [--quick]

Same model (the quickstart's SmallCNN, the zoo's definition), same data (Fashion-MNIST through the
same device-resident loader: horizontal flips, no crops), same epochs (``--dense-epochs`` dense +
``--prune-epochs`` pruning), same seed, same target: every conv and linear weight pruned together
to 1/ratio of its count (global unstructured). Per ratio:

- **plain PyTorch** — what a user writes in 40 lines: SGD + Nesterov with a OneCycle schedule,
  then ``torch.nn.utils.prune.global_unstructured`` (L1) applied every 50 steps along the cubic
  schedule (Zhu & Gupta) to the target at 70% of the pruning epochs, masks held after, peak LR
  0.05 (``--plain-ours``: also a row of the same script with ElasticTrain's pruning recipe —
  peak LR 0.2, target at 50%, no dropout — to separate what the recipe buys from the rest);
- **ElasticTrain** — ``elastictrain run`` of the two-stage pipeline ``configs/experiments/peers.yaml``
  (dense_pretrain → progressive_prune with ``{match: "*", prune: {ratio: R, scope: global}}``), the
  recipe as that file states it; and (``--variants kd``) the same **+ distillation** from its own
  dense model (``distill: {teacher: dense_pretrain, alpha: 0.5, temperature: 4}``);
- **torchao** (``--peers torchao``, installed by ``make bench-setup``) — the plain row's training and
  schedule with torchao's ``WeightNormSparsifier`` (1×1 blocks, L1) under its ``CubicSL`` scheduler
  instead of ``torch.nn.utils.prune``; per-layer, not global: each weight kept at 1/ratio
  (bench/peer_libs.py).

Each side trains its dense model once and prunes it at every ratio. Each row reports dense and
final top-1 (10,000 test images), the non-zeros kept and the seconds of dense + pruning training.
Writes bench/results/peers.json and peers.md (``--quick``: 1 + 1 epochs on 6,000 images,
``peers-quick.json`` only, never the full results).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import prune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402
from bench.peer_libs import torchao_prune  # noqa: E402
from elastictrain.data import Batches, BatchLoader, DataConfig, load  # noqa: E402
from elastictrain.models import build_model  # noqa: E402
from elastictrain.train import evaluate  # noqa: E402

PIPELINE = ROOT / "configs" / "experiments" / "peers.yaml"


class Plain:
    """The plain script: dense with OneCycle, then gradual global L1 pruning with torch's own API.
    The dense model is trained once and each ratio prunes a copy of it (as a user would)."""

    def __init__(self, a):
        self.a = a
        torch.manual_seed(a.seed)
        data = load(DataConfig(name="fashion-mnist", limit_train=a.limit_train))
        batches = Batches(batch_size=128, train=True, augment=True, hflip=True, crop_padding=0, mean=data.mean,
                          std=data.std, seed=a.seed)
        self.train = BatchLoader(data.train, batches, "cpu")
        self.test = BatchLoader(data.test, Batches(batch_size=500, train=False, mean=data.mean, std=data.std), "cpu")
        t0 = time.perf_counter()
        self.model = build_model("smallcnn", num_classes=10, in_channels=1)
        self.fit(self.model, a.dense_epochs, 0.1)
        self.dense_seconds = time.perf_counter() - t0
        self.dense_top1 = evaluate(self.model, self.test)["top1"]

    def fit(self, model: nn.Module, epochs: int, lr: float, on_step=None) -> None:
        loss_fn = nn.CrossEntropyLoss()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(self.train))
        step = 0
        for epoch in range(epochs):
            self.train.set_epoch(epoch)
            model.train()
            for x, y in self.train:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()
                sched.step()
                step += 1
                if on_step is not None:
                    on_step(step, epochs * len(self.train))

    def prune(self, ratio: float, lr: float = 0.05, end: float = 0.7, dropout: Optional[float] = None) -> dict:
        """The script's gradual pruning to ``ratio``: its own recipe by default; ``lr``, ``end`` (the
        fraction of steps where the target is reached) and ``dropout`` let it take ElasticTrain's."""
        t0 = time.perf_counter()
        model = copy.deepcopy(self.model)
        if dropout is not None:
            from pipeline.stage import set_dropout

            set_dropout(model, dropout)
        params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        total = sum(m.weight.numel() for m, _ in params)
        target = math.floor(total / ratio)

        def on_step(step: int, steps: int) -> None:
            if step % 50 and step != int(end * steps):
                return
            p = min(step / (end * steps), 1.0)
            want = max(target, round(target + (total - target) * (1 - p) ** 3))  # cubic, as Zhu & Gupta
            kept = sum(int(m.weight.ne(0).sum()) for m, _ in params)
            if kept > want:
                prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=kept - want)

        self.fit(model, self.a.prune_epochs, lr, on_step)
        for m, name in params:
            prune.remove(m, name)
        return {"dense_top1": self.dense_top1, "top1": evaluate(model, self.test)["top1"],
                "nonzeros": sum(int(m.weight.ne(0).sum()) for m, _ in params), "params": total,
                "seconds": self.dense_seconds + time.perf_counter() - t0}


# ElasticTrain's rows: a name → the pipeline settings (``--set``) that make it
VARIANTS = {
    "magnitude": ("ElasticTrain", []),
    "kd": ("ElasticTrain + distillation",
           ["stages.progressive_prune.distill={teacher: dense_pretrain, alpha: 0.5, temperature: 4.0}"]),
}


def elastictrain(ratio: float, a, out: Path, extra: list[str], dense_from: Optional[Path]) -> dict:
    """``elastictrain run`` of peers.yaml at ``ratio``; the dense stage is trained once (the first
    call) and reused (``dense_from``: its finished folder), as a rerun of the pipeline would."""
    from pipeline.config import load_cluster, read_pipeline
    from pipeline.runner import run_pipeline

    sets = [f"seed={a.seed}", f"stages.dense_pretrain.epochs={a.dense_epochs}",
            f"stages.progressive_prune.epochs={a.prune_epochs}",
            f"stages.progressive_prune.spec={{rules: [{{match: '*', prune: {{ratio: {ratio}, scope: global}}}}]}}"]
    if a.limit_train:
        sets.append(f"data.limit_train={a.limit_train}")
    sets += extra
    if out.exists():
        shutil.rmtree(out)
    if dense_from is not None:
        shutil.copytree(dense_from, out / "dense_pretrain")
    source = read_pipeline(PIPELINE, sets)
    reports = run_pipeline(source.cfg, load_cluster(ROOT / "configs/clusters/single.yaml"), out, log=lambda s: None,
                           source=source)
    dense = json.loads((out / "dense_pretrain" / "report.json").read_text())
    final = reports[-1]
    return {"dense_top1": dense["top1"], "top1": final["top1"], "nonzeros": final["nonzeros"],
            "params": final["total_params"], "seconds": dense["seconds"] + final["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", default="50,200")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense-epochs", type=int, default=4)
    ap.add_argument("--prune-epochs", type=int, default=4)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"ElasticTrain rows, of {', '.join(VARIANTS)}")
    ap.add_argument("--peers", default="torchao", help="peer libraries' rows, of torchao ('' for none)")
    ap.add_argument("--plain-ours", action="store_true",
                    help="also the plain script with ElasticTrain's pruning recipe (lr 0.2, end 50%%, no dropout)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)} (expected some of {', '.join(VARIANTS)})")
    if set(a.peers.split(",")) - {"torchao", ""}:
        ap.error(f"--peers: unknown {a.peers} (expected torchao or '')")
    if a.quick:
        a.dense_epochs, a.prune_epochs, a.limit_train = 1, 1, 6000
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    plain = Plain(a)
    dense_dir = None
    for ratio in [float(r) for r in a.ratios.split(",")]:
        runs = ROOT / "runs" / "bench-peers" / f"s{a.seed}"
        results = {"plain PyTorch (torch.nn.utils.prune)": plain.prune(ratio)}
        if a.plain_ours:
            results["plain PyTorch, ElasticTrain's recipe"] = plain.prune(ratio, lr=0.2, end=0.5, dropout=0.0)
        if "torchao" in a.peers.split(","):
            results["torchao (WeightNormSparsifier, per-layer)"] = torchao_prune(plain, ratio)
        for key in a.variants.split(","):
            label, extra = VARIANTS[key]
            results[label] = elastictrain(ratio, a, runs / f"r{ratio:g}-{key}", extra, dense_dir)
            dense_dir = dense_dir or runs / f"r{ratio:g}-{key}" / "dense_pretrain"
        for name, r in results.items():
            rows.append({"ratio": ratio, "method": name, **r, "achieved_ratio": r["params"] / max(r["nonzeros"], 1)})
        print("  ".join(f"{ratio:g}× {name}: {r['top1']:.2%}" for name, r in results.items()), flush=True)
    result = {"benchmark": "peers", "model": "smallcnn", "data": "fashion-mnist", "seed": a.seed,
              "dense_epochs": a.dense_epochs, "prune_epochs": a.prune_epochs, "limit_train": a.limit_train,
              "machine": describe(), "rows": rows}
    lines = [f"SmallCNN on Fashion-MNIST, {a.dense_epochs} dense + {a.prune_epochs} pruning epochs, seed {a.seed}, "
             "one process each; global unstructured pruning of every conv and linear weight",
             "", "| ratio | method | dense top-1 | final top-1 | drop | achieved | seconds |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        drop = 100 * (r["dense_top1"] - r["top1"])
        lines.append(f"| {r['ratio']:g}× | {r['method']} | {r['dense_top1']:.2%} | {r['top1']:.2%} | "
                     f"{drop:.2f} pp | {r['achieved_ratio']:.1f}× | {r['seconds']:.0f} |")
    print("\n".join(lines))
    name = a.out or ("peers-quick" if a.quick else "peers" if a.seed == 0 else f"peers-seed{a.seed}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if not a.quick:
        (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"wrote": str(out / f"{name}.json")}))


if __name__ == "__main__":
    main()
