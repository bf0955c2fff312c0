"""Benchmark: the seed's results table, in its shape, measured on Fashion-MNIST by the pipeline.

Run from the repository root:

    .venv/bin/python bench/table.py                  # CPU tier, VGG-CPU, 30k training images
    .venv/bin/python bench/table.py --quick          # 3,000 images, 1 epoch a stage (~1–2 min)
    .venv/bin/python bench/table.py --tier gpu [--dry-run]   # the seed's VGG16 rows (needs a GPU)
    [--rows dense,50x-unstructured] [--out runs/bench-table/cpu] [--train-images N] [--epochs N]

One dense baseline per tier is trained by the pipeline (``RUN_DIR/dense``); every other row is its
own run directory whose ``dense_pretrain`` folder links to it, so each row continues from the same
dense checkpoint: progressive prune → (quantize) → finetune, on the ``single`` cluster. The
quantized rows also link the progressive_prune stage of the row that prunes to the same spec (as
the seed's 8000×/16000× rows start from its 1000× model). The runner skips finished stages, so an
interrupted table continues where it stopped, and a row whose final stage finished is not rerun.
A run directory made under another configuration (other epochs or image counts) is refused.

Every figure comes from the stage reports (``RUN_DIR/<stage>/report.json``: measured pruning
ratio, nominal ratio, honest ratio of the packed ``model.etz``, top-1, seconds). PGD accuracy is
measured here after training (eval mode, the first ``attack_images`` test images, seeded random
start) and kept in ``RUN_DIR/<stage>/attack.json``. The seed's drops beside ours are its CIFAR-10
VGG16 figures: a reference, not the same task. Writes ``bench/results/table-<tier>.json`` (machine,
command line, per-row pipelines and figures) and ``.md``; ``--quick`` writes ``table-<tier>-quick.json``
(never the full results) and prints it as the last line; ``--train-images``/``--epochs``
runs write ``table-<tier>-custom``.

CPU recipe (VGG-CPU — ``elastictrain/models/vggcpu.py``: 0.98 M weights, 99.7% in 3×3 convs —
the first 30,000 training images, batch 128, flips only, SGD + Nesterov, warm-up then cosine to 0
in every stage; CPU tier below):
dense 8 epochs (lr 0.1); progressive prune 5 epochs (lr 0.2 after a 1.5-epoch warm-up, cubic
schedule reaching the target at 50% of the stage, masks every 50 steps) so the second half trains
at the final masks; finetune 1 epoch at lr 0.001. The quantized row shares the 200× prune stage, then
QAT 2 epochs (lr 0.005, codebooks refit every 50 steps) and the finetune epoch. The robust row
prunes (3 epochs) and finetunes (1) on the PGD-3 mix (β 0.5, ε 0.1). The whole table's seconds are
in its JSON (``stage_seconds_total``).
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

SPECS = ROOT / "configs" / "specs"
SEED_SOURCE = "seed README table: CIFAR-10 VGG16; it gives no dense accuracy — drops are against ≈93.5%, " \
              "the baseline its −0.5 / −1.4 / −5.6 pp at 50× / 100× kernel / 16000× imply"
# the seed's rows: (row, its accuracy %, drop pp) — reference figures, not measured here
SEED = {"50x-u": ("50× unstructured", 93.08, -0.5), "500x-u": ("500× unstructured", 90.95, -2.6),
        "1000x-u": ("1000× unstructured", 89.51, -4.0), "100x-k": ("100× kernel", 92.11, -1.4),
        "500x-k": ("500× kernel", 88.28, -5.2), "8000x": ("8000× (1000× + 4-bit)", 88.22, -5.3),
        "16000x": ("16000× (1000× + 2-bit × 64 cb)", 87.86, -5.6)}


@dataclass(frozen=True)
class Row:
    name: str
    """its run directory under --out, and its key for --rows."""
    label: str
    prune: Optional[str] = None
    """spec file of the progressive_prune stage (configs/specs/); None: the dense baseline."""
    quant: Optional[str] = None
    """spec file of the quantize stage."""
    prune_from: Optional[str] = None
    """row whose progressive_prune stage (same spec) this row continues from."""
    adversarial: bool = False
    """train the prune and finetune stages on the tier's adversarial mix."""
    attack: bool = False
    """measure PGD accuracy of the final model."""
    epochs: dict = field(default_factory=dict)
    """stage → epochs, over the tier's recipe."""
    seed: Optional[str] = None


@dataclass(frozen=True)
class Tier:
    model: str
    data: dict
    train_size: int
    """training images in the data set (to scale mask-update intervals with --train-images)."""
    classes_channels: tuple
    recipe: dict
    """stage name → its stage config (without spec)."""
    rows: list
    adversarial: Optional[dict] = None
    attack: Optional[dict] = None
    """the evaluation attack (PGD accuracy column)."""
    attack_images: int = 1000


SGD = {"name": "sgd", "momentum": 0.9}
NESTEROV = {**SGD, "nesterov": True}
PROGRESSIVE = {"method": "progressive", "schedule": "cubic", "end": 0.7}
# VGG-CPU (99.7% of its weights in 3×3 convs) on the first 30k of the 60k training images (the whole
# table in well under an hour on 2 cores); flips only (crops of 28×28 clothing cost accuracy in
# budgets of a few epochs). Warm-up + cosine with Nesterov in every stage.
CPU = Tier(
    model="vggcpu", data={"name": "fashion-mnist", "batch_size": 128, "crop_padding": 0, "limit_train": 30000},
    train_size=30000,
    classes_channels=(10, 1),
    recipe={"dense_pretrain": {"epochs": 8, "optimizer": {**NESTEROV, "lr": 0.1, "weight_decay": 5e-4},
                               "lr_schedule": {"name": "cosine", "warmup_epochs": 0.5}},
            # the quickstart's pruning recipe (measured on SmallCNN, bench/peers.py): twice the dense LR
            # after a warm-up over the first 30% of the stage, masks final at half the stage
            "progressive_prune": {"epochs": 5, "optimizer": {**NESTEROV, "lr": 0.2, "weight_decay": 5e-4},
                                  "lr_schedule": {"name": "cosine", "warmup_epochs": 1.5},
                                  "enforce": {**PROGRESSIVE, "end": 0.5, "update_every": 50}},
            "quantize": {"epochs": 2, "optimizer": {**NESTEROV, "lr": 0.005, "weight_decay": 0.0},
                         "enforce": {"method": "fixed", "codebook": "refit", "refit_every": 50}},
            "finetune": {"epochs": 1, "optimizer": {**NESTEROV, "lr": 0.001, "weight_decay": 0.0},
                         "enforce": {"method": "fixed", "codebook": "refit", "refit_every": 50}}},
    rows=[Row("dense", "dense", attack=True),
          Row("10x-unstructured", "10× unstructured", "vggcpu-table-10x-unstructured.yaml"),
          Row("50x-unstructured", "50× unstructured", "vggcpu-table-50x-unstructured.yaml", attack=True,
              seed="50x-u"),
          Row("200x-unstructured", "200× unstructured", "vggcpu-table-200x-unstructured.yaml"),
          Row("500x-unstructured", "500× unstructured", "vggcpu-table-500x-unstructured.yaml", seed="500x-u"),
          Row("10x-kernel", "10× kernel", "vggcpu-table-10x-kernel.yaml"),
          Row("50x-kernel", "50× kernel", "vggcpu-table-50x-kernel.yaml", seed="100x-k"),
          Row("pattern-kernel", "pattern 4-of-9 + kernel", "vggcpu-table-pattern-kernel.yaml"),
          Row("50x-balanced", "50× balanced 16×4", "vggcpu-table-50x-balanced.yaml"),
          Row("200x-2bit-64cb", "200× + 2-bit × 64 cb", "vggcpu-table-200x-unstructured.yaml",
              "vggcpu-table-200x-2bit-64cb.yaml", prune_from="200x-unstructured", seed="16000x"),
          Row("robust-50x", "50× unstructured, PGD-trained", "vggcpu-table-50x-unstructured.yaml", adversarial=True,
              attack=True, epochs={"progressive_prune": 3})],
    adversarial={"beta": 0.5, "attack": {"kind": "pgd", "eps": 0.1, "alpha": 0.025, "steps": 3}, "eval_images": 1000},
    attack={"kind": "pgd", "eps": 0.1, "alpha": 0.025, "steps": 7})
# The seed's VGG16 rows on Fashion-MNIST padded to 32×32 (one channel), with the seed's specs.
# Epochs are a guess for one H100 (~4–5 s an epoch of 60k): ≈ 355 epochs over the table.
GPU = Tier(
    model="vgg16", data={"name": "fashion-mnist", "batch_size": 128, "pad_to": 32}, train_size=60000,
    classes_channels=(10, 1),
    recipe={"dense_pretrain": {"epochs": 40, "optimizer": {**SGD, "lr": 0.05, "weight_decay": 5e-4},
                               "lr_schedule": {"name": "cosine", "warmup_epochs": 1}},
            "progressive_prune": {"epochs": 40, "optimizer": {**SGD, "lr": 0.01, "weight_decay": 5e-4},
                                  "enforce": {**PROGRESSIVE, "end": 0.75, "update_every": 200}},
            "quantize": {"epochs": 15, "optimizer": {**SGD, "lr": 0.005, "weight_decay": 0.0},
                         "enforce": {"method": "fixed", "codebook": "refit", "refit_every": 200}},
            "finetune": {"epochs": 15, "optimizer": {**SGD, "lr": 0.002, "weight_decay": 0.0},
                         "enforce": {"method": "fixed", "codebook": "refit", "refit_every": 200}}},
    rows=[Row("dense", "dense"),
          Row("50x-unstructured", "50× unstructured", "vgg16-50x-unstructured.yaml", seed="50x-u"),
          Row("500x-unstructured", "500× unstructured", "vgg16-500x-unstructured.yaml", seed="500x-u"),
          Row("1000x-unstructured", "1000× unstructured", "vgg16-1000x-unstructured.yaml", seed="1000x-u"),
          Row("100x-kernel", "100× kernel", "vgg16-100x-kernel.yaml", seed="100x-k"),
          Row("500x-kernel", "500× kernel", "vgg16-500x-kernel.yaml", seed="500x-k"),
          Row("8000x", "1000× + 4-bit", "vgg16-1000x-unstructured.yaml", "vgg16-8000x-1000x-4bit.yaml",
              prune_from="1000x-unstructured", epochs={"finetune": 5}, seed="8000x"),
          Row("16000x", "1000× + 2-bit × 64 cb", "vgg16-1000x-unstructured.yaml", "vgg16-16000x-1000x-2bit-64cb.yaml",
              prune_from="1000x-unstructured", epochs={"finetune": 5}, seed="16000x")])
TIERS = {"cpu": CPU, "gpu": GPU}


@dataclass
class Settings:
    train_images: Optional[int] = None
    test_images: Optional[int] = None
    epochs: Optional[int] = None
    """every stage this many epochs (None: the recipe's)."""
    attack_images: Optional[int] = None


# ---- pipelines ----------------------------------------------------------------------------------

def stages_of(row: Row) -> list[str]:
    if row.prune is None:
        return ["dense_pretrain"]
    return ["dense_pretrain", "progressive_prune"] + (["quantize"] if row.quant else []) + ["finetune"]


def pipeline_for(tier: Tier, row: Row, s: Settings) -> dict:
    """The row's pipeline as plain YAML data (spec paths absolute)."""
    train = min(s.train_images or tier.train_size, tier.train_size)
    steps = max(1, train // tier.data["batch_size"])
    data = {**tier.data, **({"limit_train": s.train_images} if s.train_images else {}),
            **({"limit_test": s.test_images} if s.test_images else {})}
    stages = []
    for name in stages_of(row):
        st = {"name": name, **copy.deepcopy(tier.recipe[name])}
        st["epochs"] = s.epochs or row.epochs.get(name, st["epochs"])
        enforce = st.get("enforce")
        # short runs (--quick, --train-images) update masks and codebooks more often, so the cubic
        # schedule still takes >= 25 steps over the pruning window
        if enforce and "update_every" in enforce:
            steps_to_end = int(steps * st["epochs"] * enforce["end"])
            enforce["update_every"] = max(2, min(enforce["update_every"], steps_to_end // 25))
        if enforce and "refit_every" in enforce:
            enforce["refit_every"] = max(2, min(enforce["refit_every"], steps * st["epochs"] // 5))
        if name == "progressive_prune":
            st["spec"] = str(SPECS / row.prune)
        if name == "quantize":
            st["spec"] = str(SPECS / row.quant)
        if row.adversarial and name in ("progressive_prune", "finetune"):
            st["adversarial"] = {**tier.adversarial, "eval_images": s.attack_images or tier.adversarial["eval_images"]}
        stages.append(st)
    return {"name": f"table-{tier.model}-{row.name}", "seed": 0, "model": {"name": tier.model}, "data": data,
            "stages": stages, "tracking": {"wandb": {"mode": "disabled"}}}


def write_pipeline(raw: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by bench/table.py\n" + yaml.safe_dump(raw, sort_keys=False))


def _link(run_dir: Path, stage: str, source_row: str) -> None:
    """``run_dir/stage`` → ``../source_row/stage`` (relative, so the whole --out can move)."""
    link = run_dir / stage
    target = Path("..") / source_row / stage
    if link.is_symlink() and Path(link.readlink()) == target:
        return
    if link.exists() or link.is_symlink():
        raise RuntimeError(f"{link}: expected a link to {target}; delete it to rebuild the row")
    link.symlink_to(target, target_is_directory=True)


def _finished(path: Path) -> bool:
    from pipeline.stage import is_finished

    return is_finished(path / "checkpoint.pt")


def run_row(tier: Tier, row: Row, s: Settings, out: Path, log, only: Optional[list] = None) -> None:
    """Train what the row still lacks (only ``only``'s stages when given)."""
    from elastictrain.config import ConfigError
    from pipeline.config import load_cluster, read_pipeline
    from pipeline.runner import run_pipeline

    run_dir = out / row.name
    raw = pipeline_for(tier, row, s)
    recorded = run_dir / "table-row.yaml"
    if recorded.is_file() and yaml.safe_load(recorded.read_text()) != raw:
        raise ConfigError(f"{run_dir}: made under another configuration ({recorded}); use another --out "
                          "or delete the row's folder")
    write_pipeline(raw, recorded)
    if row.prune is not None:
        _link(run_dir, "dense_pretrain", "dense")
    if row.prune_from is not None:
        source = next(r for r in tier.rows if r.name == row.prune_from)
        if not _finished(out / source.name / "progressive_prune"):
            run_row(tier, source, s, out, log, only=["progressive_prune"])
        _link(run_dir, "progressive_prune", source.name)
    wanted = only or stages_of(row)
    if all(_finished(run_dir / st) for st in wanted):
        return
    log(f"== row {row.name}: {', '.join(wanted)}")
    source = read_pipeline(recorded)
    run_pipeline(source.cfg, load_cluster(ROOT / "configs/clusters/single.yaml"), run_dir, only=only,
                 log=log, source=source)


def measure_attack(tier: Tier, row: Row, s: Settings, out: Path, log) -> Optional[dict]:
    """PGD accuracy of the row's final model, kept beside its report (recomputed if the attack changed)."""
    from elastictrain import checkpoint
    from elastictrain.data import DataConfig
    from elastictrain.data import load as load_data
    from elastictrain.data.loader import make_test_loader
    from elastictrain.files import write_json
    from elastictrain.models import build_model
    from elastictrain.train.attacks import AttackConfig, robust_accuracy

    stage_dir = out / row.name / stages_of(row)[-1]
    images = s.attack_images or tier.attack_images
    want = {"attack": tier.attack, "images": images, "seed": 0}
    path = stage_dir / "attack.json"
    if path.is_file():
        got = json.loads(path.read_text())
        if got.get("config") == want:
            return got
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = DataConfig(**{**tier.data, "limit_test": images})
    bundle = load_data(data)
    ckpt = checkpoint.load(stage_dir / "checkpoint.pt")
    model = build_model(tier.model, num_classes=bundle.num_classes, in_channels=bundle.in_channels)
    model.load_state_dict(checkpoint.model_state(ckpt))
    model.to(device).eval()
    cfg = AttackConfig(**tier.attack)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    r = robust_accuracy(model, make_test_loader(bundle, data, device), cfg, bundle.mean, bundle.std, images)
    result = {"config": want, "name": cfg.name, "accuracy": r["accuracy"], "images": r["images"],
              "seconds": time.perf_counter() - t0}
    write_json(result, path)
    log(f"== row {row.name}: {cfg.name} (ε {cfg.eps}) accuracy {r['accuracy']:.2%} on {r['images']} images")
    return result


# ---- figures and the table ----------------------------------------------------------------------

def _structure(tier: Tier, row: Row) -> str:
    """The final stage's pruning structure in words, from its spec resolved on the model's shapes."""
    from elastictrain.constraints.plan import resolve
    from elastictrain.constraints.spec import load as load_spec
    from elastictrain.models import build_model
    from pipeline.report import describe_stage

    spec = row.quant or row.prune
    if spec is None:
        return "dense"
    classes, channels = tier.classes_channels
    model = build_model(tier.model, num_classes=classes, in_channels=channels)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return describe_stage(resolve(load_spec(SPECS / spec), shapes))


def figures(tier: Tier, row: Row, out: Path, dense_top1: float, attack: Optional[dict]) -> dict:
    """The row's columns, read from its stage reports (and attack.json)."""
    run_dir = out / row.name
    reports = {st: json.loads((run_dir / st / "report.json").read_text()) for st in stages_of(row)}
    final = reports[stages_of(row)[-1]]
    quantized = [lay for lay in final["layers"] if lay["bits"] < 32]
    shared = [st for st in stages_of(row) if (run_dir / st).is_symlink() and st != "dense_pretrain"]
    own = [st for st in stages_of(row) if st != "dense_pretrain"] or ["dense_pretrain"]
    seed = SEED.get(row.seed) if row.seed else None
    return {
        "dataset": final["data"], "model": final["model"], "structure": _structure(tier, row),
        "pruning_ratio": final["pruning_ratio"], "density": final["density"],
        "bits": sorted({lay["bits"] for lay in quantized}),
        "codebooks_per_layer": {lay["name"]: lay["codebooks"] for lay in quantized},
        "nominal_compression": final["nominal_compression"], "honest_compression": final.get("honest_compression"),
        "artifact_bytes": final.get("artifact_bytes"), "top1": final["top1"],
        "drop_pp": 100 * (final["top1"] - dense_top1) if row.prune is not None else None,
        "robust_report": final.get("robust") or {},
        "pgd": attack and {k: attack[k] for k in ("name", "accuracy", "images")},
        "seconds": sum(reports[st]["seconds"] for st in own), "shared_stages": shared,
        "stages": [{"stage": st, "epochs": r["epochs"], "top1": r["top1"], "seconds": r["seconds"],
                    "pruning_ratio": r["pruning_ratio"], "shared": (run_dir / st).is_symlink()}
                   for st, r in reports.items()],
        "layers": [{k: lay[k] for k in ("name", "shape", "params", "nonzeros", "density", "bits", "codebooks",
                                        "unique_values")} for lay in final["layers"]],
        "seed": seed and {"row": seed[0], "accuracy": seed[1], "drop_pp": seed[2]},
    }


def _x(v: Optional[float]) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}×" if v >= 100 else f"{v:.3g}×"


def _codebooks(f: dict) -> str:
    books = f["codebooks_per_layer"]
    if not books:
        return "—"
    most = max(books.values(), key=list(books.values()).count)
    fewer = [f"{n.replace('.weight', '')}: {b}" for n, b in books.items() if b != most]
    return f"{most}" + (f" ({', '.join(fewer)})" if fewer else "")


def markdown(tier: Tier, rows: list[dict], s: Settings, machine: dict, quick: bool, stage_seconds: float) -> str:
    head = ["row", "dataset", "model", "structure", "pruning (measured)", "bits", "codebooks / layer", "nominal",
            "honest (model.etz)", "top-1", "drop", "seed's drop (CIFAR-10 VGG16)", "PGD", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---"] + ["---:"] * (len(head) - 4)) + "|"]
    for r in rows:
        f = r["figures"]
        seed = f["seed"]
        pgd = f["pgd"]
        lines.append("| " + " | ".join([
            r["label"], f["dataset"], f["model"], f["structure"], _x(f["pruning_ratio"]),
            "/".join(map(str, f["bits"])) or "32 (fp32)", _codebooks(f), _x(f["nominal_compression"]),
            _x(f["honest_compression"]), f"{100 * f['top1']:.2f}%",
            "baseline" if f["drop_pp"] is None else f"{f['drop_pp']:+.2f} pp",
            f"{seed['drop_pp']:+.1f} pp ({seed['row']}: {seed['accuracy']:.2f}%)" if seed else "—",
            f"{100 * pgd['accuracy']:.1f}% ({pgd['name']})" if pgd else "—",
            f"{f['seconds']:.0f}" + (" *" if f["shared_stages"] else "")]) + " |")
    train = s.train_images or tier.train_size
    atk = tier.attack
    notes = [
        f"{tier.model} on Fashion-MNIST ({train:,} training images"
        + (f", {s.test_images:,} test images" if s.test_images else ", the whole test set")
        + (f", every stage {s.epochs} epoch(s)" if s.epochs else ", epochs per the recipe in bench/table.py")
        + f"){' — QUICK run, not the benchmark' if quick else ''}; {machine['cpu_model']}, "
        + f"{machine['logical_cores']} cores"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "") + ".",
        "Pruning: parameters / non-zeros of the conv and linear weights. "
        "Nominal: the seed's 32·params / Σ non-zeros·bits. "
        "Honest: 32·params / (8 · bytes of the packed weights in model.etz). Drop: top-1 minus the dense baseline's.",
        f"Seed's drop: {SEED_SOURCE}; a reference from another data set and model, where a seed row corresponds.",
        "Codebooks / layer: the most common count, with the layers that allow fewer in brackets.",
        "Seconds: the row's stages after the shared dense one; * includes a progressive_prune stage shared with "
        f"another row (trained once). All stages once: {stage_seconds:,.0f} s.",
    ]
    if atk:
        notes.append(f"PGD: {atk['kind'].upper()}-{atk['steps']} at ε = {atk['eps']} (α = {atk['alpha']}), eval mode, "
                     f"random start (seed 0), on the first {s.attack_images or tier.attack_images:,} test images; the "
                     "robust row trains prune and finetune on (1 − β)·CE(clean) + β·CE(PGD-"
                     f"{tier.adversarial['attack']['steps']}), β = {tier.adversarial['beta']}.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


# ---- dry run ------------------------------------------------------------------------------------

def dry_run(tier: Tier, rows: list, s: Settings) -> list[dict]:
    """Validate every row's pipeline against the model's shapes (and the input size through the
    model) and print the plan; nothing is trained or written outside a temporary folder."""
    from elastictrain.data import DataConfig
    from elastictrain.models import build_model
    from pipeline.config import load_pipeline
    from pipeline.report import describe_plan
    from pipeline.runner import validate
    from pipeline.stage import plans_for

    classes, channels = tier.classes_channels
    side = DataConfig(**tier.data).pad_to or 28
    model = build_model(tier.model, num_classes=classes, in_channels=channels).eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, channels, side, side))
    assert logits.shape == (2, classes), logits.shape
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    total = sum(p.numel() for n, p in model.named_parameters() if p.dim() in (2, 4))
    print(f"{tier.model}: {side}×{side}×{channels} input → {classes} classes; {total:,} conv/linear weights")
    plan = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            raw = pipeline_for(tier, row, s)
            path = Path(tmp) / f"{row.name}.yaml"
            write_pipeline(raw, path)
            cfg = load_pipeline(path)
            validate(cfg, classes, channels)
            print(f"\n{row.name} ({row.label})" + (f"; prune stage of {row.prune_from}" if row.prune_from else ""))
            for i, st in enumerate(cfg.stages):
                if st.kind == "dense_pretrain" and row.prune is not None:
                    print("  dense_pretrain: the dense row's")
                    continue
                plans = plans_for(st, shapes, f"stages[{i}]")
                enf, quantized = st.enforce, any(p.quantize for p in plans.values())
                raw_spec = raw["stages"][i].get("spec")
                progressive = enf is not None and enf.method == "progressive"
                print(f"  {st.name}: {st.epochs} epoch(s), lr {st.optimizer.lr}"
                      + (f", masks every {enf.update_every} steps to {enf.end:.0%} of the stage" if progressive else "")
                      + (f", codebooks refit every {enf.refit_every} steps" if quantized and not progressive else "")
                      + (f", adversarial PGD-{st.adversarial.attack.steps}" if st.adversarial else "")
                      + (f", spec {Path(raw_spec).name}" if raw_spec else ""))
                groups: dict[str, list[str]] = {}  # one line per distinct layer plan
                for name, p in plans.items():
                    glob = [step for step in p.steps if step.scope == "global"]
                    keep = 1.0
                    for step in p.steps:
                        keep *= step.fraction
                    what = (f"{describe_plan(p) or 'not pruned'}, "
                            + (f"global threshold 1/{1 / glob[0].fraction:g}" if glob else f"keeps {keep:.4g}")
                            + (f", {p.bits}-bit × {p.codebooks} codebook(s)" if p.quantize else ""))
                    groups.setdefault(what, []).append(f"{name.removesuffix('.weight')} {'×'.join(map(str, p.shape))}")
                for what, names in groups.items():
                    listed = ", ".join(names) if len(names) <= 3 else f"{names[0]} … {names[-1]} ({len(names)} layers)"
                    print(f"    {listed}: {what}")
            plan.append({"row": row.name, "pipeline": raw})
    print(f"\n{len(rows)} rows validate.")
    return plan


# ---- main ---------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tier", choices=sorted(TIERS), default="cpu")
    ap.add_argument("--rows", help="comma-separated row names (default: all); the dense row always runs")
    ap.add_argument("--out", help="run directories (default runs/bench-table/<tier>[-quick|-custom])")
    ap.add_argument("--results", default=str(ROOT / "bench/results"), help="folder for table-<tier>*.json/.md")
    ap.add_argument("--quick", action="store_true", help="3,000 training and 1,000 test images, 1 epoch a stage")
    ap.add_argument("--train-images", type=int, help="first N training images (default: all)")
    ap.add_argument("--test-images", type=int, help="first N test images (default: all)")
    ap.add_argument("--epochs", type=int, help="every stage this many epochs (default: the recipe's)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print every row's plan; train nothing")
    args = ap.parse_args(argv)
    tier = TIERS[args.tier]
    by_name = {r.name: r for r in tier.rows}
    wanted = [n.strip() for n in args.rows.split(",") if n.strip()] if args.rows else list(by_name)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        ap.error(f"--rows: unknown {', '.join(unknown)} (rows: {', '.join(by_name)})")
    s = Settings(args.train_images, args.test_images, args.epochs)
    if args.quick:
        s = Settings(s.train_images or 3000, s.test_images or 1000, s.epochs or 1, attack_images=200)
    rows = [by_name["dense"]] + [by_name[n] for n in wanted if n != "dense"]
    if args.dry_run:
        return {"plan": dry_run(tier, rows, s)}
    suffix = "-quick" if args.quick else "-custom" if (args.train_images or args.test_images or args.epochs) else ""
    out = Path(args.out) if args.out else ROOT / "runs" / "bench-table" / f"{args.tier}{suffix}"
    from bench.machine import describe, write_result

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    attacks = {}
    for row in rows:
        run_row(tier, row, s, out, log)
        if row.attack and tier.attack:
            attacks[row.name] = measure_attack(tier, row, s, out, log)
    wall = time.perf_counter() - t0
    # the table: every row of the tier finished in --out under these settings (so --rows runs add up)
    done = [r for r in tier.rows if all(_finished(out / r.name / st) for st in stages_of(r))
            and yaml.safe_load((out / r.name / "table-row.yaml").read_text()) == pipeline_for(tier, r, s)]
    dense_top1 = json.loads((out / "dense" / "dense_pretrain" / "report.json").read_text())["top1"]
    table = []
    for r in done:
        attack = attacks.get(r.name)
        if attack is None and (out / r.name / stages_of(r)[-1] / "attack.json").is_file():
            attack = json.loads((out / r.name / stages_of(r)[-1] / "attack.json").read_text())
        table.append({"row": r.name, "label": r.label, "run_dir": str(out / r.name),
                      "specs": [x for x in (r.prune, r.quant) if x], "pipeline": pipeline_for(tier, r, s),
                      "figures": figures(tier, r, out, dense_top1, attack)})
    # compute of the whole table: every stage once (shared stages are one folder), from the reports
    stage_dirs = {(out / r.name / st).resolve() for r in done for st in stages_of(r)}
    stage_seconds = sum(json.loads((d / "report.json").read_text())["seconds"] for d in stage_dirs)
    machine = describe()
    md = markdown(tier, table, s, machine, args.quick, stage_seconds)
    print("\n" + md)
    result = {"benchmark": "table", "tier": args.tier, "quick": args.quick, "machine": machine,
              "command": shlex.join([sys.executable, *sys.argv] if argv is None else ["bench/table.py", *argv]),
              "settings": {"train_images": s.train_images or tier.train_size, "test_images": s.test_images,
                           "epochs": s.epochs, "attack_images": s.attack_images or tier.attack_images},
              "recipe": tier.recipe, "adversarial": tier.adversarial, "attack": tier.attack, "out": str(out),
              "wall_seconds": wall, "stage_seconds_total": stage_seconds, "rows_run": [r.name for r in rows],
              "missing_rows": [r.name for r in tier.rows if r not in done],
              "seed_reference": {"source": SEED_SOURCE, "rows": SEED}, "rows": table}
    name = f"table-{args.tier}{suffix}"
    results = Path(args.results)
    write_result(result, results / f"{name}.json")
    if args.quick:  # printed above; only the JSON is kept (bench/results/*-quick.json is not committed)
        print(json.dumps(result))
    else:
        (results / f"{name}.md").write_text(f"# Results table — {args.tier} tier\n\n" + md)
    return result


if __name__ == "__main__":
    main()
