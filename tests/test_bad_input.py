"""Bad input, all in one table: pipeline, cluster and compression-spec configs and the CLI.

Every case must end in one line ``elastictrain: error: WHERE: WHY`` (exit 2) that names the field
path or the file, before any worker or training starts, and must leave an existing run directory
(a finished ``dense_pretrain`` stage of the same pipeline) exactly as it was: every file's bytes
and mtime, and no new file.
"""
from __future__ import annotations

import copy
import gzip
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
HAS_DATA = (FMNIST / "train-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(not HAS_DATA, reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")

PRUNE = {"rules": [{"match": "features.3.weight", "prune": {"unit": "kernel", "ratio": 4}},
                   {"match": "classifier.0.weight", "prune": {"ratio": 16}},
                   {"match": "classifier.3.weight", "prune": {"ratio": 2}}]}
MIXTURE = {"rules": [{**r, "quantize": {"bits": 2}} for r in PRUNE["rules"]]}
PIPELINE = {
    "name": "tiny", "seed": 0, "model": {"name": "smallcnn"},
    "data": {"name": "fashion-mnist", "batch_size": 100, "limit_train": 200, "limit_test": 100},
    "stages": [{"name": "dense_pretrain", "epochs": 1, "optimizer": {"lr": 0.05}},
               {"name": "progressive_prune", "epochs": 1, "spec": PRUNE},
               {"name": "quantize", "epochs": 1, "spec": MIXTURE},
               {"name": "finetune", "epochs": 1}],
}
SINGLE = {"name": "cpu", "kind": "single", "device": "cpu", "threads": 1}


def write_idx(path: Path, array: np.ndarray) -> None:
    head = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(head + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def existing(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory holding a finished dense_pretrain stage, a 5-class IDX data folder)."""
    tmp = tmp_path_factory.mktemp("existing")
    run = tmp / "run"
    if HAS_DATA:  # the real thing: the pipeline's first stage, run once
        (tmp / "p.yaml").write_text(yaml.safe_dump(PIPELINE))
        (tmp / "c.yaml").write_text(yaml.safe_dump(SINGLE))
        assert main(["run", str(tmp / "p.yaml"), "--cluster", str(tmp / "c.yaml"), "--out", str(run),
                     "--stages", "dense_pretrain"]) == 0
    else:  # a stand-in with the same files, for the cases that need no data
        assert main(["init", "smallcnn", "--in-channels", "1",
                     "--out", str(run / "dense_pretrain" / "checkpoint.pt")]) == 0
        (run / "dense_pretrain" / "report.json").write_text('{"stage": "dense_pretrain"}\n')
    assert (run / "dense_pretrain" / "checkpoint.pt").is_file() and (run / "dense_pretrain" / "report.json").is_file()
    five = tmp / "five"  # Fashion-MNIST-shaped files with 5 classes
    five.mkdir()
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(five / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (120, 28, 28)))
        write_idx(five / f"{prefix}-labels-idx1-ubyte.gz", np.arange(120) % 5)
    return run, five


@dataclass
class Work:
    """Where a case writes its (bad) inputs: ``tmp``, apart from the run directory ``run``."""

    run: Path
    five: Path
    tmp: Path
    env: dict = field(default_factory=dict)
    """environment variables the case sets."""

    @property
    def ckpt(self) -> str:
        return str(self.run / "dense_pretrain" / "checkpoint.pt")

    def file(self, name: str, content) -> str:
        path = self.tmp / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        return str(path)

    def pipeline(self, edit: Callable[[dict], object] | None = None) -> str:
        cfg = copy.deepcopy(PIPELINE)
        if edit is not None:
            edit(cfg)
        return self.file("pipeline.yaml", cfg)

    def cluster(self, **over) -> str:
        return self.file("cluster.yaml", {**SINGLE, **over})

    def ray(self, **ray) -> str:
        return self.cluster(kind="ray", ray={"address": "local", "num_workers": 2,
                                             "storage_path": str(self.tmp / "ray"), **ray})

    def slurm(self, **slurm) -> str:
        return self.cluster(name="slurm", kind="slurm", slurm={"nodes": 1, "time": "00:30:00", **slurm})

    def cmd_run(self, edit=None, *extra: str, cluster: str | None = None) -> list[str]:
        return ["run", self.pipeline(edit), "--cluster", cluster or self.cluster(), "--out", str(self.run), *extra]

    def fresh_run(self, edit=None) -> list[str]:
        """``run`` into a new run directory (nothing finished there to compare the model with)."""
        return ["run", self.pipeline(edit), "--cluster", self.cluster(), "--out", str(self.tmp / "fresh")]

    def submit(self, **slurm) -> list[str]:
        """(``--dry-run``: were a check to regress, nothing reaches a real Slurm.)"""
        return ["submit", self.pipeline(), "--cluster", self.slurm(**slurm), "--out", str(self.run), "--dry-run"]

    def compress(self, rule: dict) -> list[str]:
        spec = self.file("spec.yaml", {"rules": [rule]})
        return ["compress", self.ckpt, "--spec", spec, "--out", str(self.run / "compressed.pt")]

    def verify(self, rule: dict) -> list[str]:
        return ["verify", self.ckpt, "--spec", self.file("spec.yaml", {"rules": [rule]})]


def stage(i: int, **kw) -> Callable[[dict], None]:
    return lambda c: c["stages"][i].update(kw)


def _set(section: str, **kw) -> Callable[[dict], None]:
    return lambda c: c[section].update(kw)


def _eval_five_class_head(w: Work) -> list[str]:
    five = w.tmp / "five-class.pt"
    assert main(["init", "smallcnn", "--num-classes", "5", "--in-channels", "1", "--out", str(five)]) == 0
    return ["eval", str(five), "--data", "fashion-mnist", "--limit-test", "100"]


def _eval_vgg16_without_pad(w: Work) -> list[str]:
    vgg = w.tmp / "vgg16.pt"
    assert main(["init", "vgg16", "--in-channels", "1", "--out", str(vgg)]) == 0
    return ["eval", str(vgg), "--data", "fashion-mnist", "--limit-test", "100"]


def case(name: str, argv: Callable[[Work], list[str]], message: str, data: bool = False, no_gpu: bool = False):
    """A row: ``argv(work)`` gives the command line; ``message`` (``{tmp}`` is the case's folder) must be
    in the error. ``no_gpu``: the case is a machine without one (skipped where a GPU is visible)."""
    marks = [needs_data] if data else []
    if no_gpu:
        marks.append(pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here"))
    return pytest.param(argv, message, id=name, marks=marks)


LOOSER = {"rules": [{**r, "prune": {**r["prune"], "ratio": 2}, "quantize": {"bits": 2}} for r in PRUNE["rules"]]}
K = "features.3.weight"

CASES = [
    # pipeline files
    case("pipeline-unknown-key", lambda w: w.cmd_run(lambda c: c.update(epochs=3)),
         "pipeline.yaml: epochs: unknown key"),
    case("stage-unknown-key", lambda w: w.cmd_run(stage(0, epoch=2)), "pipeline.yaml: stages[0].epoch: unknown key"),
    case("wrong-type", lambda w: w.cmd_run(_set("data", batch_size="big")),
         "data.batch_size: expected an integer, got 'big'"),
    case("negative-lr", lambda w: w.cmd_run(lambda c: c["stages"][0]["optimizer"].update(lr=-0.1)),
         "stages[0].optimizer.lr: must be > 0"),
    case("empty-stage-list", lambda w: w.cmd_run(lambda c: c.update(stages=[])),
         "stages: must hold at least one stage"),
    case("duplicate-stage", lambda w: w.cmd_run(lambda c: c["stages"].append({"name": "finetune"})),
         "stages[4].name: duplicate stage name 'finetune'"),
    case("bad-yaml", lambda w: ["run", w.file("pipeline.yaml", "name: tiny\nstages: [\n"), "--out", str(w.run)],
         "pipeline.yaml: line 3: not valid YAML"),
    case("empty-file", lambda w: ["run", w.file("pipeline.yaml", ""), "--out", str(w.run)],
         "pipeline.yaml: empty file"),
    case("missing-pipeline", lambda w: ["run", str(w.tmp / "nope.yaml"), "--out", str(w.run)],
         "nope.yaml: no such file"),
    case("missing-spec-file", lambda w: w.cmd_run(stage(1, spec="nope.yaml")), "stages[1].spec: no such file"),
    case("missing-data-root", lambda w: w.cmd_run(_set("data", root=str(w.tmp / "nowhere"))),
         "data.root: {tmp}/nowhere is not a directory"),
    case("wandb-mode", lambda w: w.cmd_run(lambda c: c.update(tracking={"wandb": {"mode": "loud"}})),
         "tracking.wandb.mode: must be one of 'auto', 'online', 'offline', 'disabled' (got 'loud')"),
    case("wandb-mode-env", lambda w: (w.env.update(WANDB_MODE="sometimes"), w.cmd_run())[1],
         "tracking.wandb.mode: auto took WANDB_MODE='sometimes' from the environment"),
    case("secret-in-config", lambda w: w.cmd_run(lambda c: c.update(tracking={"wandb": {"api_key": "abc"}})),
         "pipeline.yaml: tracking.wandb.api_key: looks like a secret; keys and tokens come from the environment"),
    case("bad-set", lambda w: w.cmd_run(None, "--set", "data.batch_size"),
         "--set 'data.batch_size': expected KEY=VALUE"),
    case("bad-set-path", lambda w: w.cmd_run(None, "--set", "stages.prune.epochs=2"),
         "--set stages.prune.epochs: no item 'prune'"),
    case("unknown-stage-option", lambda w: w.cmd_run(None, "--stages", "quantise"),
         "--stages: no stage named 'quantise'"),
    case("bad-cli-option", lambda w: ["eval", w.ckpt, "--batch-size", "lots"],
         "eval: argument --batch-size: invalid int value: 'lots'"),
    # pipelines that are valid files but do not fit the model or the run directory (data needed)
    case("loosening-stage", lambda w: w.cmd_run(stage(2, spec=LOOSER)),
         "stages[2].spec: keeps 50.0000% of features.3.weight, more than 25.0000% under stages[1] (progressive_prune)",
         data=True),
    case("spec-matches-nothing",
         lambda w: w.cmd_run(stage(1, spec={"rules": [{"match": "encoder.*", "prune": {"ratio": 2}}]})),
         "stages[1].spec: rules[0].match: 'encoder.*' matches no", data=True),
    case("wrong-num-classes", lambda w: w.cmd_run(_set("data", root=str(w.five))),
         "dense_pretrain/checkpoint.pt: finished with num_classes 10 (this pipeline: 5)", data=True),
    case("batch-larger-than-data", lambda w: w.cmd_run(_set("data", limit_train=50)),
         "data.batch_size: 100 is more than the 50 training examples (data.limit_train: 50)", data=True),
    case("unknown-model", lambda w: w.fresh_run(lambda c: c["model"].update(name="vgg17")),
         "pipeline 'tiny': model.name: unknown model 'vgg17' (expected one of", data=True),
    case("model-does-not-fit-data", lambda w: w.fresh_run(lambda c: c["model"].update(name="vgg16")),
         "pipeline 'tiny': model vgg16: input 1×28×28 does not fit the model (at features.", data=True),
    case("model-does-not-fit-data-on-ray", lambda w: ["run", w.pipeline(lambda c: c["model"].update(name="vgg16")),
                                                      "--cluster", w.ray(), "--out", str(w.tmp / "fresh")],
         "pipeline 'tiny': model vgg16: input 1×28×28 does not fit the model (at features.", data=True),
    case("other-model-over-run", lambda w: w.cmd_run(lambda c: c["model"].update(name="lenet5")),
         "dense_pretrain/checkpoint.pt: finished with model 'smallcnn' (this pipeline: 'lenet5')", data=True),
    # cluster files
    case("cluster-unknown-key", lambda w: w.cmd_run(cluster=w.cluster(gpus=1)), "cluster.yaml: gpus: unknown key"),
    case("cluster-wrong-type", lambda w: w.cmd_run(cluster=w.ray(num_workers="two")),
         "cluster.yaml: ray.num_workers: expected an integer, got 'two'"),
    case("cuda-without-gpu", lambda w: w.cmd_run(cluster=w.cluster(device="cuda")),
         "device: cuda asked for, but no GPU is visible", no_gpu=True),
    case("ray-gpus-without-gpu", lambda w: w.cmd_run(cluster=w.ray(gpus_per_worker=1)),
         "ray.gpus_per_worker: 1.0 × 2 workers asked for, but 0 GPUs are visible", no_gpu=True),
    case("batch-over-workers", lambda w: w.cmd_run(cluster=w.ray(num_workers=3)),
         "data.batch_size: 100 (the global batch) does not divide over ray.num_workers: 3"),
    case("slurm-impossible-time", lambda w: w.submit(time="10:75:00"),
         "cluster.yaml: slurm.time: minutes and seconds must be 00..59 (got '10:75:00')"),
    case("slurm-zero-time", lambda w: w.submit(time="0:00"),
         "cluster.yaml: slurm.time: must be longer than 0 (got '0:00')"),
    case("submit-model-does-not-fit-data", lambda w: ["submit", w.pipeline(lambda c: c["model"].update(name="vgg16")),
                                                      "--cluster", w.slurm(), "--out", str(w.tmp / "fresh")],
         "pipeline 'tiny': model vgg16: input 1×28×28 does not fit the model (at features.", data=True),
    case("ray-head-not-answering", lambda w: w.cmd_run(cluster=w.cluster(
        kind="ray", ray={"address": "127.0.0.1:1", "connect_timeout_s": 2, "storage_path": str(w.tmp / "ray")})),
         "ray.address: nothing answers at 127.0.0.1:1 within ray.connect_timeout_s (2 s): connection refused",
         data=True),
    case("jobs-api-not-answering", lambda w: ["submit", w.pipeline(), "--cluster", w.cluster(
        kind="ray", ray={"address": "127.0.0.1:1", "job_server": "http://127.0.0.1:1", "connect_timeout_s": 2}),
        "--out", str(w.run)],
         "ray.job_server: nothing answers at http://127.0.0.1:1 within ray.connect_timeout_s (2 s)", data=True),
    case("slurm-zero-nodes", lambda w: w.submit(nodes=0), "cluster.yaml: slurm.nodes: must be >= 1 (got 0)"),
    case("missing-cluster", lambda w: ["run", w.pipeline(), "--cluster", str(w.tmp / "nope.yaml"), "--out", str(w.run)],
         "nope.yaml: no such file"),
    # compression specs, through compress and verify of the finished checkpoint
    case("spec-unknown-key", lambda w: w.compress({"match": K, "prune_ratio": 4}),
         "spec.yaml: rules[0].prune_ratio: unknown key"),
    case("ratio-below-1", lambda w: w.compress({"match": K, "prune": {"ratio": 0.5}}),
         "spec.yaml: rules[0].prune.ratio: must be >= 1 (got 0.5)"),
    case("bits-0", lambda w: w.compress({"match": K, "quantize": {"bits": 0}}),
         "spec.yaml: rules[0].quantize.bits: must be 1..8 (got 0)"),
    case("bits-9", lambda w: w.verify({"match": K, "quantize": {"bits": 9}}),
         "spec.yaml: rules[0].quantize.bits: must be 1..8 (got 9)"),
    case("nm-5-4", lambda w: w.compress({"match": K, "nm": "5:4"}),
         "spec.yaml: rules[0].nm.n: must satisfy 1 <= n <= m (got 5:4)"),
    case("grid-does-not-divide", lambda w: w.compress({"match": K, "prune": {"ratio": 2, "unit": {"filter": 5}}}),
         "spec.yaml: rules[0].prune.unit.filter: 5 parts do not divide"),
    case("rule-matches-nothing", lambda w: w.verify({"match": "encoder.*", "prune": {"ratio": 2}}),
         "spec.yaml: rules[0].match: 'encoder.*' matches no"),
    case("pattern-too-many-entries", lambda w: w.compress({"match": K, "pattern": {"entries": 10}}),
         "spec.yaml: rules[0].pattern.entries: 10 > 9 positions"),
    case("missing-spec", lambda w: ["verify", w.ckpt, "--spec", str(w.tmp / "nope.yaml")], "nope.yaml: no such file"),
    # checkpoints that are not there, or do not fit the data
    case("eval-missing-checkpoint", lambda w: ["eval", str(w.run / "nope.pt")], "nope.pt: no such checkpoint"),
    case("compress-missing-checkpoint",
         lambda w: ["compress", str(w.run / "nope.pt"), "--spec", w.file("s.yaml", PRUNE),
                    "--out", str(w.run / "c.pt")], "nope.pt: no such checkpoint"),
    case("verify-missing-checkpoint", lambda w: ["verify", str(w.run / "nope.pt"), "--spec", w.file("s.yaml", PRUNE)],
         "nope.pt: no such checkpoint"),
    case("export-missing-checkpoint", lambda w: ["export", str(w.run / "nope.pt"), "--out", str(w.run / "m.etz")],
         "nope.pt: no such checkpoint"),
    case("eval-missing-artifact", lambda w: ["eval", str(w.run / "nope.etz")], "nope.etz: no such artifact"),
    case("eval-cuda-without-gpu", lambda w: ["eval", w.ckpt, "--device", "cuda"],
         "--device: cuda asked for, but no GPU is visible", no_gpu=True),
    case("eval-model-does-not-fit-data", _eval_vgg16_without_pad,
         "vgg16.pt: model vgg16 on fashion-mnist: input 1×28×28 does not fit the model (at features.", data=True),
    case("eval-wrong-num-classes", _eval_five_class_head,
         "five-class.pt: the model maps 1-channel images to 5 classes; "
         "fashion-mnist has 1-channel images of 10 classes",
         data=True),
]


def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv,message", CASES)
def test_bad_input_is_one_line_error_before_work_and_touches_nothing(existing, tmp_path, capsys, monkeypatch,
                                                                      argv, message):
    run, five = existing
    w = Work(run, five, tmp_path)
    args = argv(w)
    for k, v in w.env.items():
        monkeypatch.setenv(k, v)
    before = _files(run)
    capsys.readouterr()
    assert main(args) == 2, args
    out, err = capsys.readouterr()
    err = err.strip()
    assert "\n" not in err and err.startswith("elastictrain: error: "), err
    assert message.format(tmp=tmp_path) in err, err
    assert "epoch 1/" not in out and "img/s" not in out, out  # no training step ran
    assert _files(run) == before  # same files, same bytes, same mtimes
    assert not (tmp_path / "ray").exists()  # no Ray worker wrote its storage
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_the_table_holds_at_least_25_distinct_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) >= 25
