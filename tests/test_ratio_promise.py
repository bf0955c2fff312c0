"""A ratio is a promise: no layer keeps more than its ratio allows. Counts round down (at least one
unit per layer / workload), so balanced workloads never round a layer over its budget — VGG16's
``features.7`` at kernel ratio 10 over 16×4 workloads kept 832 kernels where 819 are allowed when
counts rounded to nearest."""
import warnings

import pytest
import torch

from elastictrain.constraints.plan import resolve
from elastictrain.constraints.projection import project
from elastictrain.constraints.spec import parse
from elastictrain.models import build_model

VGG = {n: tuple(p.shape) for n, p in build_model("vgg16", num_classes=10, in_channels=3).named_parameters()}


@pytest.mark.parametrize("prune, balance, unit_size", [
    ({"unit": "kernel", "ratio": 10}, {"filter": 16, "channel": 4}, 9),
    ({"ratio": 50}, {"filter": 16, "channel": 4}, 1),
    ({"unit": "kernel", "ratio": 7}, {"filter": 8}, 9),
    ({"ratio": 333}, {"filter": 4, "channel": 2}, 1),
])
def test_balanced_layers_never_keep_more_than_their_ratio(prune, balance, unit_size):
    spec = parse({"rules": [{"match": "features.[1-9]*.weight", "layer": "conv", "prune": prune,
                             "balance": balance}]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (rounding down moves some layers' ratios; said, not an error here)
        plans = resolve(spec, VGG)
    torch.manual_seed(0)
    weights = {n: torch.randn(VGG[n]) for n in plans}
    _, states = project(weights, plans)
    for n, plan in plans.items():
        step = plan.steps[0]
        workloads = torch.Size(step.workload).numel()
        allowed = plan.params / prune["ratio"]
        kept = int(states[n].mask.sum())
        assert kept == step.keep * workloads * unit_size  # equal counts in every workload
        if step.keep > 1:  # (one unit per workload is the floor, whatever the ratio)
            assert kept <= allowed + 1e-6, f"{n}: {kept} non-zeros kept, {allowed:.1f} allowed"
    if prune == {"unit": "kernel", "ratio": 10}:
        assert int(states["features.7.weight"].mask.sum()) // 9 == 768  # 12 a workload: 819.2 allowed; 832 before


def test_a_moved_ratio_is_said_naming_layer_and_both_ratios():
    spec = parse({"rules": [{"match": "features.0.weight", "prune": {"unit": "kernel", "ratio": 4},
                             "balance": {"filter": 8}}]})  # 8 filters × 3 channels = 24 kernels a workload
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        resolve(spec, VGG)
    assert seen == []  # 24 / 4 = 6 kept exactly: nothing to say
    spec = parse({"rules": [{"match": "features.0.weight", "prune": {"unit": "kernel", "ratio": 5},
                             "balance": {"filter": 8}}]})
    with pytest.warns(UserWarning, match=r"features\.0\.weight keeps 4 of 24 units per workload, 6× instead of 5×"):
        resolve(spec, VGG)
