"""Bad specs: one-line errors naming the field path, raised before any tensor is touched."""
import pytest

from elastictrain.config import ConfigError
from elastictrain.constraints.plan import resolve
from elastictrain.constraints.spec import parse

SHAPES = {"features.0.weight": (64, 3, 3, 3), "features.1.weight": (64,), "features.3.weight": (64, 64, 3, 3),
          "classifier.weight": (10, 64), "classifier.bias": (10,)}


def rule(**kw):
    return {"rules": [{"match": "features.3.weight", **kw}]}


CASES = [
    ({"rule": []}, "rule: unknown key"),
    ({"rules": []}, "rules: must hold at least one rule"),
    ({"rules": [{"prune": {"ratio": 2}}]}, "rules[0].match: required"),
    (rule(prune={"ratio": 0.5}), "rules[0].prune.ratio: must be >= 1"),
    (rule(prune={"density": 1.5}), "rules[0].prune.density: must be in (0, 1]"),
    (rule(prune={"ratio": 2, "density": 0.5}), "rules[0].prune.ratio: give exactly one"),
    (rule(prune={"ratio": "ten"}), "rules[0].prune.ratio: expected a number"),
    (rule(prune={"ratio": 2, "unit": "kernal"}), "rules[0].prune.unit: unknown unit 'kernal'"),
    (rule(prune={"ratio": 2, "unit": {"filter": "each", "chanel": 2}}), "rules[0].prune.unit.chanel: unknown key"),
    (rule(prune={"ratio": 2, "scope": "world"}), "rules[0].prune.scope: must be one of 'layer', 'global'"),
    (rule(prune={"ratio": 2, "pool": "a"}), "rules[0].prune.pool: only global steps"),
    (rule(prune=[{"ratio": 2}, {"ratio": 0}]), "rules[0].prune[1].ratio: must be >= 1"),
    (rule(quantize={"bits": 0}), "rules[0].quantize.bits: must be 1..8"),
    (rule(quantize={"bits": 9}), "rules[0].quantize.bits: must be 1..8"),
    (rule(quantize={"bits": 2, "method": "lloyd"}), "rules[0].quantize.method: must be one of"),
    (rule(quantize={"bits": 2, "groups": {"filter": 0}}), "rules[0].quantize.groups.filter: must be"),
    (rule(pattern={"entries": 0}), "rules[0].pattern.entries: must be >= 1"),
    (rule(pattern={"entries": 2, "patterns": 1, "library": [[0, 1], [1, 2]]}),
     "rules[0].pattern.library: holds 2 patterns"),
    (rule(nm="2-4"), "rules[0].nm: expected 'N:M'"),
    (rule(nm="5:4"), "rules[0].nm.n: must satisfy 1 <= n <= m"),
    (rule(balance={"filter": 4}), "rules[0].balance: needs a prune step"),
    (rule(prune={"ratio": 2, "scope": "global"}, balance={"filter": 4}), "rules[0].prune.scope: global scope cannot"),
    (rule(layer="dense"), "rules[0].layer: must be one of 'conv', 'linear'"),
    ({"rules": [{"match": "features.3.weight", "prune": {"ratio": 2}}], "version": 2}, "version: unsupported"),
]

RESOLVE_CASES = [
    ({"rules": [{"match": "encoder.*", "prune": {"ratio": 2}}]}, "rules[0].match: 'encoder.*' matches no"),
    ({"rules": [{"match": "*.bias", "prune": {"ratio": 2}}]}, "rules[0].match: '*.bias' matches no"),
    ({"rules": [{"match": "features.*", "layer": "linear", "prune": {"ratio": 2}}]}, "matches no linear parameter"),
    ({"rules": [{"match": "features.*.weight", "prune": {"ratio": 2}, "balance": {"channel": 4}}]},
     "rules[0].balance.channel: 4 parts do not divide the channel axis of features.0.weight (size 3)"),
    ({"rules": [{"match": "features.3.weight", "prune": {"ratio": 2, "unit": {"filter": 5}}}]},
     "rules[0].prune.unit.filter: 5 parts do not divide"),
    ({"rules": [{"match": "features.3.weight", "prune": {"ratio": 2, "unit": "filter"}, "balance": {"channel": 4}}]},
     "rules[0].balance: workloads"),
    ({"rules": [{"match": "classifier.weight", "pattern": {"entries": 2}}]},
     "rules[0].pattern: classifier.weight is a linear weight"),
    ({"rules": [{"match": "features.3.weight", "pattern": {"entries": 10}}]},
     "rules[0].pattern.entries: 10 > 9 positions"),
    ({"rules": [{"match": "features.3.weight", "pattern": {"entries": 1, "library": [[9]]}}]},
     "rules[0].pattern.library[0]: position 9 outside"),
    ({"rules": [{"match": "classifier.weight", "nm": "2:3"}]}, "rules[0].nm: m=3 does not divide"),
    ({"rules": [{"match": "features.0.weight", "prune": {"ratio": 2, "scope": "global", "pool": "p"}},
                {"match": "*.weight", "prune": {"ratio": 3, "scope": "global", "pool": "p"}}]},
     "rules[1].prune.pool: pool 'p' keeps 3× here but 2× at rules[0].prune"),
    ({"rules": [{"match": "*.weight", "prune": {"ratio": 2}}, {"match": "classifier.weight", "prune": {"ratio": 3}}]},
     "rules[1].match: 'classifier.weight' matches no conv/linear parameter "
     "(or only ones an earlier rule already took)"),
]


@pytest.mark.parametrize("data,message", CASES + RESOLVE_CASES)
def test_bad_spec_is_one_line_error_naming_the_field(data, message):
    with pytest.raises(ConfigError) as err:
        resolve(parse(data, "my.yaml"), SHAPES, "my.yaml")
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("my.yaml: ")
    assert message in text, text


def test_good_spec_resolves_first_matching_rule_and_skips_1d_params():
    spec = parse({"rules": [{"match": "features.0.weight"},  # exempt: stays dense
                            {"match": "*.weight", "prune": {"ratio": 4}}]})
    plans = resolve(spec, SHAPES)
    assert list(plans) == ["features.3.weight", "classifier.weight"]
    assert plans["features.3.weight"].steps[0].keep == 64 * 64 * 9 // 4


def test_balance_that_moves_the_ratio_warns_naming_layer():
    spec = parse({"rules": [{"match": "features.3.weight", "prune": {"unit": "kernel", "ratio": 100},
                             "balance": {"filter": 16, "channel": 4}}]})
    with pytest.warns(UserWarning, match=r"rules\[0\].balance: features.3.weight keeps 1 of 64 units per workload, "
                                         r"64× instead of 100×"):
        resolve(spec, SHAPES)
