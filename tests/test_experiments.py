"""Every shipped pipeline validates — configs, specs against the model's shapes, and the
tightening rule — without data or training."""
from pathlib import Path

import pytest

from elastictrain.config import ConfigError
from pipeline.config import load_cluster, load_pipeline
from pipeline.runner import validate

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
SHAPES = {"fashion-mnist": (10, 1), "mnist": (10, 1), "cifar10": (10, 3), "cifar100": (100, 3)}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_validates(path):
    cfg = load_pipeline(path)
    classes, channels = SHAPES[cfg.data.name]
    validate(cfg, classes, channels)
    assert [s.kind for s in cfg.stages][0] == "dense_pretrain"
    assert cfg.stages[-1].spec is not None  # ends constrained


def test_seed_table_rows_are_all_there():
    names = {p.stem for p in EXPERIMENTS}
    for row in ("50x-unstructured", "500x-unstructured", "1000x-unstructured", "100x-kernel", "500x-kernel", "8000x",
                "16000x"):
        assert f"vgg16-cifar10-{row}" in names


def test_cluster_configs_load():
    kinds = {p.stem: load_cluster(p).kind for p in (ROOT / "configs" / "clusters").glob("*.yaml")}
    assert kinds == {"single": "single", "local": "ray", "ray-local": "ray", "ray-nodes": "ray",
                     "slurm-local": "slurm", "slurm-2x8gpu": "slurm"}


def test_bad_cluster_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nkind: kubernetes\n")
    with pytest.raises(ConfigError, match=r"c.yaml: kind: must be one of 'single', 'ray', 'slurm'"):
        load_cluster(p)
