"""elastictrain.measure.structure (structured / balance / codebook statistics) against hand-computed counts,
and pipeline.plots writing real PNGs."""
import json
import math

import pytest
import torch

from elastictrain.compress import compress_state_dict
from elastictrain.config import ConfigError
from elastictrain.constraints.grid import Grid
from elastictrain.constraints.spec import load as load_spec
from elastictrain.measure import structure as ins
from elastictrain.models import build_model


def zero_kernels_conv() -> torch.Tensor:
    """(4, 4, 3, 3) of ones with filter 1 and kernels (0,1), (2,1), (3,1), (2,3) zero, plus one lone zero.

    Entirely zero: kernels 4 (filter 1) + 4 = 8 of 16; filters 1 of 4; channels: channel 1 (its
    kernels in filters 0, 1, 2, 3 are all zero) = 1 of 4; elements 8·9 + 1 = 73 of 144.
    """
    w = torch.ones(4, 4, 3, 3)
    w[1] = 0
    for f, c in [(0, 1), (2, 1), (3, 1), (2, 3)]:
        w[f, c] = 0
    w[0, 0, 1, 1] = 0  # a zero inside a kernel that stays alive
    return w


@pytest.mark.parametrize("unit, units, zero", [("kernel", 16, 8), ("filter", 4, 1), ("channel", 4, 1),
                                               ("element", 144, 73), ({"filter": 2, "channel": 2}, 4, 0),
                                               ("{channel: each, row: each}", 12, 3)])
def test_structured_counts_entirely_zero_units(unit, units, zero):
    # channel × row units: channel 1 has its three rows zero everywhere → 3 of 4·3 = 12
    (r,) = ins.structured_stats({"c.weight": zero_kernels_conv(), "c.bias": torch.zeros(4)}, unit)
    assert (r["name"], r["kind"], r["shape"]) == ("c.weight", "conv", [4, 4, 3, 3])
    assert (r["units"], r["zero_units"], r["kept_units"]) == (units, zero, units - zero)
    assert math.isclose(r["zero_fraction"], zero / units)


def test_structured_linear_rows_and_non_dividing_grid_is_reported():
    lin = torch.arange(1.0, 25.0).reshape(4, 6)
    lin[2] = 0
    w = {"first.weight": torch.ones(8, 3, 3, 3), "fc.weight": lin}
    first, fc = ins.structured_stats(w, {"channel": 2})
    assert "skipped" in first and "channel" in first["skipped"] and "first.weight" in first["skipped"]
    assert "units" not in first
    assert (fc["units"], fc["zero_units"]) == (2, 0)  # two channel halves of a (4, 6) weight: neither all zero
    (fc_f,) = ins.structured_stats({"fc.weight": lin}, "filter")
    assert (fc_f["units"], fc_f["zero_units"]) == (4, 1)


def test_balance_equal_and_unequal_2x2_workloads():
    # (4, 4) linear, workloads of 2×2: top-left, top-right, bottom-left, bottom-right
    eq = torch.tensor([[1., 0., 2., 0.],
                       [0., 3., 0., 4.],
                       [5., 6., 0., 0.],
                       [0., 0., 7., 8.]])  # 2 non-zeros in every workload
    (r,) = ins.balance_stats({"fc.weight": eq}, {"filter": 2, "channel": 2})
    assert (r["workloads"], r["workload_size"], r["min"], r["max"], r["mean"], r["equal"]) == (4, 4, 2, 2, 2.0, True)
    assert r["imbalance"] == 1.0
    uneq = torch.tensor([[1., 1., 1., 0.],
                         [1., 1., 0., 0.],
                         [1., 0., 0., 1.],
                         [0., 1., 0., 0.]])  # workloads hold 4, 1, 2, 1 non-zeros
    (r,) = ins.balance_stats({"fc.weight": uneq}, {"filter": 2, "channel": 2})
    assert (r["min"], r["max"], r["mean"], r["equal"], r["imbalance"]) == (1, 4, 2.0, False, 2.0)
    # the same tensor by rows: 3, 2, 2, 1
    (r,) = ins.balance_stats({"fc.weight": uneq}, "filter")
    assert (r["workloads"], r["min"], r["max"], r["mean"]) == (4, 1, 3, 2.0)


def test_codebook_unique_values_per_group():
    w = torch.tensor([[0.5, -0.5, 0.0, 1.0, 0.5, 0.5, -0.0, 1.0],
                      [1.0, 0.0, 0.5, 0.5, -0.5, 0.0, 0.0, 0.0],     # group 0 (rows 0-1): {±0.5, 1} → 3
                      [0.25, 0.75, -0.25, 0.0, 0.0, 0.25, 2.0, 0.0],
                      [-0.75, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25]])  # group 1: {±0.25, ±0.75, 2} → 5
    (r,) = ins.codebook_stats({"fc.weight": w}, {"filter": 2})
    assert (r["groups"], r["group_size"], r["max_unique"], r["mean_unique"], r["fits_bits"]) == (2, 16, 5, 4.0, 3)
    (r,) = ins.codebook_stats({"fc.weight": w}, "filter")  # per row: 3, 3, 4, 2
    assert (r["groups"], r["max_unique"], r["mean_unique"], r["fits_bits"]) == (4, 4, 3.0, 2)
    (r,) = ins.codebook_stats({"fc.weight": w}, Grid())  # one group: 3 + 5 distinct values
    assert (r["groups"], r["max_unique"], r["fits_bits"]) == (1, 8, 3)


@pytest.mark.parametrize("n, bits", [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (256, 8), (257, 9)])
def test_fits_bits(n, bits):
    assert ins.fits_bits(n) == bits


def test_parse_grid_forms_and_errors():
    assert ins.parse_grid("kernel") == Grid("each", "each")
    assert ins.parse_grid({"filter": 16, "channel": 4}) == Grid(16, 4)
    assert ins.parse_grid("{filter: 16, channel: 4}") == Grid(16, 4)
    g = Grid(row="each")
    assert ins.parse_grid(g) is g
    with pytest.raises(ConfigError, match="unit: unknown unit 'kernal'"):
        ins.parse_grid("kernal", "unit")
    with pytest.raises(ConfigError, match="balance.filtr: unknown key"):
        ins.parse_grid({"filtr": 2}, "balance")
    with pytest.raises(ConfigError, match="groups.channel: must be"):
        ins.parse_grid("{channel: 0}", "groups")


def test_compressed_model_is_balanced_and_fits_its_codes():
    torch.manual_seed(0)
    sd = build_model("smallcnn", num_classes=10, in_channels=1).state_dict()
    c = compress_state_dict(sd, load_spec("configs/specs/smallcnn-mixture.yaml"))
    w = {"classifier.0.weight": c.state_dict["classifier.0.weight"]}
    (b,) = ins.balance_stats(w, {"filter": 16, "channel": 4})
    assert b["equal"] and b["workloads"] == 64 and b["min"] > 0
    (q,) = ins.codebook_stats(w, {"filter": 16, "channel": 4})
    assert q["groups"] == 64 and 1 <= q["max_unique"] <= 4 and q["fits_bits"] <= 2


def test_summary_json_and_text():
    w = {"c.weight": zero_kernels_conv(), "c.bias": torch.zeros(4), "dead.weight": torch.zeros(2, 4),
         "first.weight": torch.ones(4, 3, 1, 1)}
    s = ins.summary(w, unit="kernel", balance={"channel": 2}, groups="filter")
    text = json.dumps(s, allow_nan=False)  # no Infinity: dead.weight's ∞ pruning ratio is null
    assert json.loads(text) == s
    dead = s["layers"][1]
    assert dead["name"] == "dead.weight" and dead["pruning_ratio"] is None
    assert s["total_params"] == 144 + 8 + 12 and s["nonzeros"] == 71 + 12
    st = s["structured"]
    assert (st["units"], st["zero_units"]) == (16 + 8 + 12, 8 + 8 + 0) and st["skipped"] == 0
    bal = s["balance"]
    assert bal["skipped"] == 1 and "channel" in bal["layers"][2]["skipped"]  # 2 does not divide 3 channels
    assert bal["equal"] is False
    (c_bal,) = [r for r in bal["layers"] if r["name"] == "c.weight"]
    # channels 0-1 non-zeros: filter 0: 9 − 1 (lone zero) + 0 = 8; filter 2: 9; filter 3: 9 → 26;
    # channels 2-3: 9·2·3 − 9 = 45
    assert (c_bal["min"], c_bal["max"]) == (26, 45)
    assert s["codebooks"]["max_unique"] == 1 and s["codebooks"]["fits_bits"] == 0
    out = ins.format_summary(s)
    for needle in ("Structured sparsity", "16 of 36 units", "Workload balance", "NOT equal", "skipped: channel",
                   "Codebooks", "dead.weight", "inf"):
        assert needle in out, needle
    assert set(ins.summary(w)) == set(ins.summary(w, unit="kernel")) - {"structured"}


# ---------------------------------------------------------------------------------------------- plots
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_shape(path):
    import matplotlib.image as mimage
    assert path.read_bytes()[:8] == PNG_MAGIC
    return mimage.imread(path).shape


def test_weight_histograms_png(tmp_path):
    from pipeline import plots
    g = torch.Generator().manual_seed(0)
    w = {f"l{i}.weight": torch.randn(8, 4, 3, 3, generator=g) * (torch.rand(8, 4, 3, 3, generator=g) > 0.5)
         for i in range(4)}
    w["fc.weight"] = torch.zeros(10, 8)  # no non-zeros: an empty, labelled axes
    w["fc.bias"] = torch.ones(10)  # not a layer
    fig = plots.histogram_figure(w)
    assert len(fig.axes) == 5  # one per conv/linear weight; the 4×2 grid's 3 spare cells removed
    assert [a.get_xlabel() for a in fig.axes] == ["weight value"] * 5
    assert fig.axes[4].get_title().startswith("fc.weight\nnnz 0 of 80")
    nnz = int((w["l0.weight"] != 0).sum())
    assert sum(p.get_height() for p in fig.axes[0].patches) == nnz  # the histogram counts every non-zero
    path = plots.weight_histograms(w, tmp_path / "sub" / "hist.png")
    assert path == tmp_path / "sub" / "hist.png"
    h, wd, _ = _png_shape(path)
    assert 500 <= h <= 700 and 1500 <= wd <= 1800  # 4 columns × 2 rows of subplots
    assert [p.name for p in path.parent.iterdir()] == ["hist.png"]  # no temporary file left


def test_density_chart_png(tmp_path):
    from pipeline import plots
    w = {"a.weight": torch.ones(4, 4), "b.weight": torch.tensor([[1.0, 0, 0, 0]] * 25), "c.weight": torch.zeros(3, 3)}
    s = ins.summary(w)
    fig = plots.density_figure(s)
    (ax,) = fig.axes
    assert (ax.get_yscale() == "log"
            and [t.get_text() for t in ax.get_xticklabels()] == ["a.weight", "b.weight", "c.weight"])
    assert ax.get_xlabel() == "layer" and ax.get_ylabel().startswith("density")
    heights = [p.get_height() for p in ax.patches]
    assert heights[:2] == [1.0, 0.25] and math.isnan(heights[2])  # the empty layer is a "0" label, not a bar
    path = plots.density_chart(s, tmp_path / "density.png")
    h, wd, _ = _png_shape(path)
    assert 400 <= h <= 600 and 500 <= wd <= 1200
    with pytest.raises(ValueError, match="no layers"):
        plots.density_chart({"layers": []}, tmp_path / "x.png")
