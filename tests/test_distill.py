"""Knowledge distillation: the soft-target term against a hand-computed reference, a frozen
teacher, and a pipeline stage that distils from its dense model (checkpointed by reference)."""
import math
from pathlib import Path

import pytest
import torch
import yaml
from test_pipeline import FMNIST, PRUNE, SINGLE

from elastictrain import checkpoint
from elastictrain.config import ConfigError
from elastictrain.train.distill import DistillConfig, Teacher, soft_loss
from pipeline.config import load_cluster, load_pipeline
from pipeline.runner import run_pipeline

pytestmark = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing")


def test_soft_loss_is_t_squared_kl_of_softened_distributions():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0
    ref = 0.0
    for s_row, t_row in zip(s.tolist(), t.tolist()):  # Σ p_t (log p_t − log p_s), by hand
        zs = [math.exp(v / T) for v in s_row]
        zt = [math.exp(v / T) for v in t_row]
        ps, pt = [v / sum(zs) for v in zs], [v / sum(zt) for v in zt]
        ref += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
    assert soft_loss(s, t, T).item() == pytest.approx(ref / 2 * T * T, rel=1e-6)
    assert soft_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_teacher_is_frozen_and_mixes_by_alpha():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    teacher = Teacher(net, DistillConfig(teacher="dense", alpha=0.25, temperature=3.0))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.randn(5, 4)
    student = torch.randn(5, 3, requires_grad=True)
    task = torch.tensor(1.5)
    mixed = teacher.mix(task, x, student)
    with torch.no_grad():
        expect = 0.75 * 1.5 + 0.25 * soft_loss(student, net(x), 3.0)
    assert mixed.item() == pytest.approx(expect.item(), rel=1e-6)
    mixed.backward()  # gradients reach the student only
    assert student.grad is not None and all(p.grad is None for p in net.parameters())
    assert Teacher(net, DistillConfig(teacher="dense", alpha=0.0)).mix(task, x, student) is task
    stats = net[1].running_mean.clone()
    teacher.mix(task, x, student)
    assert torch.equal(net[1].running_mean, stats)  # eval mode: BatchNorm statistics untouched


@pytest.mark.parametrize("bad, message", [
    ({"alpha": 1.5}, "stages[1].distill.alpha: must be in [0, 1]"),
    ({"temperature": 0}, "stages[1].distill.temperature: must be > 0"),
    ({"teacher": "progressive_prune"}, "stages[1].distill.teacher: 'progressive_prune' is not an earlier stage"),
    ({"teacher": "quantize"}, "stages[1].distill.teacher: 'quantize' is not an earlier stage (a later stage"),
])
def test_bad_distill_settings_are_one_line_errors(tmp_path, bad, message):
    path = _pipeline(tmp_path, {"teacher": "dense_pretrain", **bad})
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def _pipeline(tmp: Path, distill: dict) -> Path:
    cfg = {"name": "kd", "seed": 0, "model": {"name": "smallcnn"},
           "data": {"name": "fashion-mnist", "batch_size": 100, "limit_train": 2000, "limit_test": 500},
           "stages": [{"name": "dense_pretrain", "epochs": 1, "optimizer": {"lr": 0.05}},
                      {"name": "progressive_prune", "epochs": 1, "spec": PRUNE, "distill": distill,
                       "enforce": {"method": "progressive", "update_every": 5, "end": 0.7}},
                      {"name": "quantize", "epochs": 1, "spec": PRUNE}]}
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_stage_distils_from_its_dense_model_by_reference(tmp_path):
    path = _pipeline(tmp_path, {"teacher": "dense_pretrain", "alpha": 0.7, "temperature": 2.0})
    cfg = load_pipeline(path)
    cfg.stages = cfg.stages[:2]
    reports = run_pipeline(cfg, load_cluster(SINGLE), tmp_path / "out", log=lambda s: None)
    dense_file = tmp_path / "out" / "dense_pretrain" / "checkpoint.pt"
    ref = reports[1]["distill"]
    assert ref == {"teacher": "dense_pretrain", "checkpoint": str(dense_file),
                   "sha256": checkpoint.file_digest(dense_file), "alpha": 0.7, "temperature": 2.0}
    assert reports[0]["distill"] is None
    ckpt = checkpoint.load(tmp_path / "out" / "progressive_prune" / "checkpoint.pt")
    assert ckpt["distill"] == ref  # the teacher by reference: no teacher weights in the student's checkpoint
    assert set(ckpt["model_state_dict"]) == set(checkpoint.load(dense_file)["model_state_dict"])
    assert math.isfinite(reports[1]["history"][0]["loss"]) and reports[1]["top1"] > 0.5
