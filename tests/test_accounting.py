"""Compression accounting against hand-computed figures."""
import math

import torch

from elastictrain.constraints.plan import resolve
from elastictrain.constraints.spec import parse
from elastictrain.measure.accounting import relative_index_bits, report


def test_relative_index_hand_computed():
    # gaps 1 and 100: a 7-bit field holds both (2 × 7 bits); 6 bits needs one filler (3 × 6 = 18)
    assert relative_index_bits(torch.tensor([0, 100]), 0) == (14, 7)
    # gaps 2 and 5 with 32-bit values: w=2 → 2·(2+32) + one 2-bit filler = 70 (w=3 ties at 70; first wins)
    assert relative_index_bits(torch.tensor([1, 6]), 32) == (70, 2)


def test_layer_storage_picks_cheapest_encoding():
    w = {"fc.weight": torch.tensor([[0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0]]), "fc.bias": torch.zeros(1)}
    rep = report(w, {})
    (layer,) = rep["layers"]
    assert (layer["params"], layer["nonzeros"], layer["bits"]) == (8, 2, 32)
    assert layer["encoding"] == "relative-2" and layer["storage_bits"] == 70  # bitmap 72, dense 256
    assert rep["other_params"] == 1 and rep["model_storage_bits"] == 70 + 32
    assert rep["pruning_ratio"] == 4.0 and rep["nominal_compression"] == 32 * 8 / 64


def test_seed_nominal_ratio_1000x_pruning_2bit_is_16000x():
    torch.manual_seed(0)
    w = {"conv.weight": torch.randn(64, 64, 5, 5)}  # 102400 weights
    spec = parse({"rules": [{"match": "*", "prune": {"ratio": 1000},
                             "quantize": {"bits": 2, "groups": {"filter": 4}}}]})
    plans = resolve(spec, {k: tuple(v.shape) for k, v in w.items()})
    from elastictrain.constraints.projection import project
    out, _ = project(w, plans)
    rep = report(out, plans)
    assert rep["nonzeros"] == 102 and rep["layers"][0]["codebooks"] == 4
    assert math.isclose(rep["nominal_compression"], 32 * 102400 / (102 * 2))
    assert 15000 < rep["nominal_compression"] < 17000
    l = rep["layers"][0]
    # stored bits = index + 2-bit values + 4 codebooks × 4 values × 32 bits: far less than nominal claims
    assert l["codebook_bits"] == 4 * 4 * 32 and l["storage_bits"] == l["index_value_bits"] + 512
    assert l["index_value_bits"] >= 102 * 2 and rep["storage_compression"] < rep["nominal_compression"]


def test_pattern_encoding_counts_library_and_ids():
    w = torch.zeros(4, 2, 3, 3)
    w[0, 0, 0, :2] = 1.0  # pattern A
    w[1, 1, 0, :2] = 2.0  # pattern A
    w[3, 0, 2, 1:] = 3.0  # pattern B
    rep = report({"c.weight": w}, {})
    l = rep["layers"][0]
    # kernels alive at flat kernel indices 0, 3, 6 → gaps 1, 3, 3; with 1-bit pattern ids:
    # best relative width w=2 → 3·(2+1) = 9; library 2 × 9 bits; values 6 × 32
    assert l["encoding"] == "pattern" and l["storage_bits"] == 9 + 18 + 6 * 32
