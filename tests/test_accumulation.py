"""Gradient accumulation on one process: A micro-batches of B make one optimizer step that equals a
step on a batch of A·B — same weights to float tolerance, same masks, the same number of steps,
mask updates and LR values — and an epoch's micro-batches that do not fill a step are left out.
(On two DeepSpeed ranks: ``test_ray``'s comparison with one process, accumulation 2.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from elastictrain import checkpoint
from pipeline.config import load_cluster, read_pipeline
from pipeline.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.is_file(),
                                reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
STAGES = [{"name": "prune", "kind": "progressive_prune", "epochs": 2,
           "spec": str(ROOT / "configs/specs/lenet5-test.yaml"),
           "optimizer": {"lr": 0.02, "momentum": 0.9}, "lr_schedule": {"name": "cosine"},
           "enforce": {"method": "progressive", "update_every": 2, "end": 0.75}}]


def _run(tmp: Path, batch: int, accumulation: int, limit: int = 1200) -> dict:
    # LeNet-5 has no BatchNorm and nothing here augments, so the micro-batches of one step are
    # exactly the rows of the larger batch (the epoch's order does not depend on the batch size)
    pipe = tmp / f"p{batch}x{accumulation}.yaml"
    pipe.write_text(yaml.safe_dump({"name": "acc", "seed": 0, "model": {"name": "lenet5"}, "stages": STAGES,
                                    "data": {"name": "fashion-mnist", "batch_size": batch, "limit_train": limit,
                                             "limit_test": 300, "augment": False}}))
    clu = tmp / f"c{accumulation}.yaml"
    clu.write_text(yaml.safe_dump({"name": "single", "kind": "single", "device": "cpu", "threads": 1,
                                   "gradient_accumulation": accumulation}))
    out = tmp / f"out{batch}x{accumulation}"
    source = read_pipeline(pipe)
    run_pipeline(source.cfg, load_cluster(clu), out, log=lambda s: None, source=source)
    return {"state": checkpoint.load(out / "prune" / "checkpoint.pt"),
            "report": json.loads((out / "prune" / "report.json").read_text())}


def test_accumulating_two_batches_of_b_trains_like_one_batch_of_2b(tmp_path):
    big, acc = _run(tmp_path, 200, 1), _run(tmp_path, 100, 2)
    a, b = big["state"]["model_state_dict"], acc["state"]["model_state_dict"]
    for n in a:
        assert torch.allclose(a[n], b[n], atol=2e-5, rtol=1e-4), f"{n}: {float((a[n] - b[n]).abs().max())}"
    masks_a, masks_b = checkpoint.buffers(big["state"])["weight_mask"], checkpoint.buffers(acc["state"])["weight_mask"]
    assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)
    ra, rb = big["report"], acc["report"]
    assert [h["steps"] for h in ra["history"]] == [h["steps"] for h in rb["history"]] == [6, 6]
    assert ra["constraint_stats"]["mask_updates"] == rb["constraint_stats"]["mask_updates"] > 1
    assert ra["nonzeros"] == rb["nonzeros"]


def test_micro_batches_that_do_not_fill_a_step_are_left_out(tmp_path):
    r = _run(tmp_path, 100, 2, limit=700)  # 7 micro-batches an epoch: 3 steps, the 7th left out
    assert [h["steps"] for h in r["report"]["history"]] == [3, 3]
    assert r["state"]["local_dict"]["step"] == 6  # the constrainer counted optimizer steps
