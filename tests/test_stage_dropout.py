"""A stage's ``dropout`` sets every dropout layer's probability for that stage; bad values are refused
at load time, naming the stage."""
import pytest
import torch

from elastictrain.config import ConfigError, build
from elastictrain.models import build_model
from pipeline.config import PipelineConfig
from pipeline.stage import set_dropout


def _pipeline(dropout):
    return {"name": "p", "model": {"name": "smallcnn"}, "data": {"name": "fashion-mnist"},
            "stages": [{"name": "dense_pretrain"},
                       {"name": "progressive_prune", "dropout": dropout,
                        "spec": {"rules": [{"match": "*", "prune": {"ratio": 10}}]}}]}


def test_dropout_reaches_every_layer():
    model = build_model("smallcnn", num_classes=10, in_channels=1)
    before = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert before == [0.2]
    assert set_dropout(model, 0.0) == 1
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.0]
    assert set_dropout(build_model("vggcpu", num_classes=10, in_channels=1), 0.0) == 0


def test_dropout_is_validated():
    cfg = build(PipelineConfig, _pipeline(0.0))
    assert cfg.stages[1].dropout == 0.0 and cfg.stages[0].dropout is None
    with pytest.raises(ConfigError, match=r"stages\[1\]\.dropout"):
        build(PipelineConfig, _pipeline(1.5))


