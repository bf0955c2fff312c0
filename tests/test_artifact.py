"""The packed artifact (.etz): bit-identical round trips, the entropy coder, corrupt files, the floor."""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from elastictrain import artifact, checkpoint
from elastictrain.artifact import entropy, masks
from elastictrain.artifact.format import Payload, write
from elastictrain.compress import compress_state_dict
from elastictrain.config import to_plain
from elastictrain.constraints.spec import load as load_spec
from elastictrain.constraints.spec import parse
from elastictrain.models import build_model
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]

SPECS = {
    "unstructured": {"rules": [{"match": "*", "prune": {"ratio": 10}}]},
    "kernel": {"rules": [{"match": "features.3.weight", "prune": {"unit": "kernel", "ratio": 4}},
                         {"match": "classifier.0.weight", "prune": {"unit": "filter", "ratio": 8}},
                         {"match": "classifier.3.weight", "prune": {"ratio": 2}}]},
    "quantized": {"rules": [{"match": "features.0.weight", "quantize": {"bits": 2, "groups": {"filter": 8}}},
                            {"match": "classifier.0.weight", "prune": {"ratio": 64, "scope": "global"},
                             "quantize": {"bits": 2, "groups": {"filter": 16, "channel": 4}}},
                            {"match": "classifier.3.weight", "quantize": {"bits": 3}}]},
    "pattern": {"rules": [{"match": "features.3.weight", "prune": {"unit": "kernel", "ratio": 4},
                           "pattern": {"entries": 4, "patterns": 8}, "quantize": {"bits": 2, "groups": {"filter": 16}}},
                          {"match": "classifier.0.weight", "prune": {"ratio": 64},
                           "balance": {"filter": 16, "channel": 4}}]},
}


def smallcnn_ckpt(spec: dict, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    sd = build_model("smallcnn", num_classes=10, in_channels=1).state_dict()
    c = compress_state_dict(sd, parse(spec))
    assert not c.violations
    return checkpoint.compressed_checkpoint(c.state_dict, c.states, spec, epoch=3, extra={"stage": "prune"})


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool or a.numel() == 0:
        return torch.equal(a, b)
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_round_trip(ck: dict, back: dict) -> None:
    sd, got = checkpoint.model_state(ck), back["model_state_dict"]
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v) and bitwise_equal(got[k], v), k
    ob, gb = checkpoint.buffers(ck), checkpoint.buffers(back)
    for key in ("weight_mask", "structured_weight_mask", "pattern_library", "quantization_table"):
        assert set(gb[key]) == set(ob[key]), key
        for n, t in ob[key].items():
            assert bitwise_equal(gb[key][n], t), (key, n)
    assert back["local_dict"] == ck["local_dict"] and back["spec"] == ck["spec"] and back["format"] == ck["format"]


@pytest.mark.parametrize("case", sorted(SPECS))
def test_round_trip_bit_identical(tmp_path, case):
    ck = smallcnn_ckpt(SPECS[case])
    rep = artifact.export(ck, tmp_path / "m.etz")
    assert rep["bytes"] == (tmp_path / "m.etz").stat().st_size
    assert rep["bytes"] == rep["header_bytes"] + rep["weights_bytes"] + rep["other_bytes"]
    back = artifact.load(tmp_path / "m.etz")
    assert_round_trip(ck, back)
    assert back["stage"] == "prune" and back["artifact"]["bytes"] == rep["bytes"]
    levels = {l["name"]: l["mask"] for l in rep["layers"]}
    if case == "kernel":
        assert levels["features.3.weight"].startswith("unit 64×32×1×1")
        assert levels["classifier.0.weight"].startswith("unit 256×1×1×1")
    if case == "pattern":
        assert levels["features.3.weight"].startswith("pattern")
    # the loaded dict drives a model exactly like the checkpoint does
    model = build_model("smallcnn", num_classes=10, in_channels=1).eval()
    x = torch.randn(4, 1, 28, 28)
    model.load_state_dict(ck["model_state_dict"])
    y0 = model(x)
    model.load_state_dict(back["model_state_dict"])
    assert torch.equal(model(x), y0)
    # artifact ≥ floor, per layer and in total
    fl = artifact.floor_bits(ck)
    assert 8 * rep["weights_bytes"] >= fl["weights_bits"]
    for l, f in zip(rep["layers"], fl["layers"]):
        assert 8 * l["bytes"] >= f["bits"] - 1e-6, l["name"]


def test_no_spec_infers_codebook_groups_and_odd_checkpoints_round_trip(tmp_path):
    ck = smallcnn_ckpt(SPECS["quantized"])
    ck["spec"] = None                          # groups must be inferred from the table and the values
    w = ck["model_state_dict"]["classifier.3.weight"]
    w[0, 0] = 0.0                              # a kept entry that is exactly 0 (not in its codebook)
    ck["model_state_dict"]["features.3.weight"][0, 0, 0, 0] = -0.0   # -0.0 is not +0.0 bitwise
    ck["model_state_dict"]["fc.extra"] = torch.randn(3, 4, dtype=torch.float64)
    ck["local_dict"]["note"] = object()        # not JSON: dropped, reported
    rep = artifact.export(ck, tmp_path / "m.etz")
    assert rep["dropped"] == ["local_dict.note"]
    back = artifact.load(tmp_path / "m.etz")
    del ck["local_dict"]["note"]
    assert_round_trip(ck, back)
    values = {l["name"]: l["values"] for l in rep["layers"]}
    assert values["features.0.weight"] == "codes" and values["classifier.0.weight"] == "codes"
    assert values["classifier.3.weight"] == "raw"   # a kept 0 cannot be a code: stored raw, still exact


def test_plain_state_dict_round_trips(tmp_path):
    torch.manual_seed(1)
    sd = build_model("smallcnn", num_classes=10, in_channels=1).state_dict()
    rep = artifact.export(sd, tmp_path / "dense.etz")
    back = artifact.load(tmp_path / "dense.etz")
    assert rep["dropped"] == [] and back["format"] == checkpoint.FORMAT and back["spec"] is None
    assert all(bitwise_equal(back["model_state_dict"][k], v) for k, v in sd.items())
    assert not any(checkpoint.buffers(back).values())
    assert {l["mask"] for l in rep["layers"]} == {"element/all"} and rep["honest_compression"] == 1.0


def test_bn_fp16_halves_other_tensors_and_keeps_weights_exact(tmp_path):
    ck = smallcnn_ckpt(SPECS["pattern"])
    r32 = artifact.export(ck, tmp_path / "a.etz")
    r16 = artifact.export(ck, tmp_path / "b.etz", bn_dtype="fp16")
    assert r16["weights_bytes"] == r32["weights_bytes"] and r16["other_bytes"] < 0.6 * r32["other_bytes"]
    back = artifact.load(tmp_path / "b.etz")["model_state_dict"]
    for k, v in ck["model_state_dict"].items():
        if k.endswith("running_var") or k.endswith("bias"):
            assert back[k].dtype == v.dtype and torch.allclose(back[k], v, rtol=1e-3, atol=1e-4)
    assert bitwise_equal(back["classifier.0.weight"], ck["model_state_dict"]["classifier.0.weight"])
    with pytest.raises(ValueError, match="bn_dtype"):
        artifact.export(ck, tmp_path / "c.etz", bn_dtype="int8")


# --- the entropy coder ----------------------------------------------------------------------------

streams = st.integers(1, 40).flatmap(lambda a: st.lists(st.integers(0, a - 1), max_size=400))


@given(streams)
def test_huffman_and_int_streams_round_trip(xs):
    x = np.asarray(xs, dtype=np.int64)
    blob = entropy.huffman_encode(x)
    assert np.array_equal(entropy.huffman_decode(blob, x.size), x)
    if x.size:
        assert 8 * len(blob) >= entropy.entropy_bits(x)            # no prefix code beats the entropy
        assert entropy.huffman_bits(np.bincount(x)) == 8 * len(blob)
    params, blob = entropy.encode_ints(x)
    assert np.array_equal(entropy.decode_ints(params, blob, x.size), x)


@given(st.lists(st.integers(0, 2**20), min_size=1, max_size=50), st.integers(0, 21))
def test_bit_packing_round_trips(xs, width):
    x = np.asarray(xs, dtype=np.int64) & ((1 << width) - 1)
    assert np.array_equal(entropy.unpack_fixed(entropy.pack_bits(x, width), x.size, width), x)


def test_huffman_edge_cases_and_speed():
    assert entropy.huffman_encode(np.zeros(0, dtype=np.int64)) == b""
    one = entropy.huffman_encode(np.full(1000, 7))
    assert len(one) <= 6 and np.array_equal(entropy.huffman_decode(one, 1000), np.full(1000, 7))
    skew = np.repeat(np.arange(30), 2 ** np.arange(30) // 2**12 + 1)     # forces the 15-bit length limit
    assert entropy.code_lengths(np.bincount(skew)).max() <= entropy.MAX_LEN
    assert np.array_equal(entropy.huffman_decode(entropy.huffman_encode(skew), skew.size), skew)
    x = np.minimum(np.random.default_rng(0).geometric(0.4, 300_000) - 1, 5)
    blob = entropy.huffman_encode(x)
    import time
    t0 = time.perf_counter()
    assert np.array_equal(entropy.huffman_decode(blob, x.size), x)
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(ValueError):
        entropy.huffman_decode(blob[: len(blob) // 2], x.size)


@given(st.integers(1, 3000), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_position_codings_round_trip(n, density, seed):
    keep = np.random.default_rng(seed).random(n) < density
    params, blob = masks.encode_positions(keep)
    assert np.array_equal(masks.decode_positions(params, blob, n, int(keep.sum())), keep)
    assert len(blob) <= (n + 7) // 8                                # never worse than a bitmap


# --- corrupt files ------------------------------------------------------------------------------

def one_line_value_error(path: Path, match: str):
    with pytest.raises(ValueError, match=match) as e:
        artifact.load(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_corrupt_and_truncated_files_fail_cleanly(tmp_path):
    ck = smallcnn_ckpt(SPECS["pattern"])
    good = tmp_path / "m.etz"
    artifact.export(ck, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.etz"
    for cut in (0, 3, 17, 30, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        one_line_value_error(bad, "truncated")
    bad.write_bytes(data + b"\0")
    one_line_value_error(bad, "trailing")
    for at in (25, len(data) // 2, len(data) - 2):
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        bad.write_bytes(bytes(flipped))
        one_line_value_error(bad, "CRC")
    bad.write_bytes(b"PK\x03\x04" + data[4:])
    one_line_value_error(bad, "magic")
    bad.write_bytes(data[:4] + struct.pack("<H", 9) + data[6:])
    one_line_value_error(bad, "version 9")
    one_line_value_error(tmp_path / "missing.etz", "cannot read")


def test_well_framed_but_inconsistent_metadata_fails_cleanly(tmp_path):
    """A valid frame and CRC around wrong contents (a writer bug, not bit rot) still fails in one line."""
    ck = smallcnn_ckpt(SPECS["pattern"])
    good = tmp_path / "m.etz"
    artifact.export(ck, good)
    data = good.read_bytes()
    h = struct.unpack_from("<I", data, 6)[0]
    import json
    meta = json.loads(zlib.decompress(data[18:18 + h]))
    payload = Payload()
    payload.put(data[18 + h:-4])
    weight = next(t for t in meta["tensors"] if t["name"] == "features.3.weight")
    for mutate, match in [
        (lambda t: t["values"].__setitem__("blob", [0, 10**9]), "outside"),
        (lambda t: t.__setitem__("kept", t["kept"] + 1), "features.3.weight"),
        (lambda t: t["mask"]["pos"].__setitem__("enc", "zip"), "zip"),
        (lambda t: t.__setitem__("shape", [3]), "shape"),
        (lambda t: t["mask"].pop("parts"), "KeyError"),
    ]:
        broken = json.loads(json.dumps(meta))
        mutate(next(t for t in broken["tensors"] if t["name"] == weight["name"]))
        write(tmp_path / "x.etz", broken, payload)
        one_line_value_error(tmp_path / "x.etz", match)


# --- VGG16: the seed's 1000× + 2-bit × 64 codebooks, against the floor ----------------------------

def test_vgg16_1000x_2bit_within_factor_of_floor(tmp_path):
    torch.manual_seed(0)
    sd = build_model("vgg16").state_dict()
    spec = load_spec(ROOT / "configs/specs/vgg16-16000x-1000x-2bit-64cb.yaml")
    c = compress_state_dict(sd, spec)
    ck = checkpoint.compressed_checkpoint(c.state_dict, c.states, to_plain(spec))
    rep = artifact.export(ck, tmp_path / "vgg.etz")
    assert_round_trip(ck, artifact.load(tmp_path / "vgg.etz"))
    fl = artifact.floor_bits(ck)
    ratio = 8 * rep["weights_bytes"] / fl["weights_bits"]
    assert 1.0 <= ratio <= 1.15, ratio
    # the honest ratio sits far below the seed's nominal 16000×, and above the accounting estimate
    assert math.isclose(c.report["nominal_compression"], 16000, rel_tol=1e-3)
    assert c.report["storage_compression"] < rep["honest_compression"] < 16000


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_research_release_masks_of_any_dtype_export_near_the_floor(tmp_path, dtype):
    """A checkpoint as PyTorch-style pruning code writes it — no spec, the masks 0/1 tensors of the
    weights' dtype (or uint8) — packs like our bool masks: the mask is the weights' support, stored
    once and cast back on load (bit-identical), so the artifact stays within 1.15× of its entropy
    floor and far below the dense weights."""
    torch.manual_seed(0)
    sd = build_model("vgg16").state_dict()
    c = compress_state_dict(sd, parse({"rules": [{"match": "*.weight", "prune": {"ratio": 20, "scope": "global"}}]}))
    ck = checkpoint.compressed_checkpoint(c.state_dict, c.states, None)
    masks = ck["elastic_trainer_state_dict"]["model_buffers_state_dict"]["weight_mask"]
    for name in masks:
        masks[name] = masks[name].to(dtype)
    rep = artifact.export(ck, tmp_path / "vgg.etz")
    assert_round_trip(ck, artifact.load(tmp_path / "vgg.etz"))
    ratio = 8 * rep["weights_bytes"] / artifact.floor_bits(ck)["weights_bits"]
    assert 1.0 <= ratio <= 1.15, ratio
    dense = 4 * sum(v.numel() for k, v in ck["model_state_dict"].items() if k.endswith(".weight"))
    assert rep["bytes"] < dense / 10


def test_weights_outside_their_masks_export_as_the_masked_model(tmp_path, capsys):
    """Masks that disagree with the weights — the weights saved before their last masking, masks as
    float 0/1 — export as weight × mask, the model the masks define: within 1.15× of that model's
    floor, the report (and `export`'s one warning line) counting what lay outside."""
    torch.manual_seed(0)
    sd = build_model("vgg16").state_dict()
    c = compress_state_dict(sd, parse({"rules": [{"match": "*.weight", "prune": {"ratio": 20, "scope": "global"}}]}))
    ck = checkpoint.compressed_checkpoint(c.state_dict, c.states, None)
    masks = ck["elastic_trainer_state_dict"]["model_buffers_state_dict"]["weight_mask"]
    outside = {}
    for n in masks:
        w = ck["model_state_dict"][n]
        w.add_(torch.randn_like(w) * 1e-3 * (torch.rand_like(w) < 0.3))  # non-zeros outside the mask
        outside[n] = int(((w != 0) & ~masks[n]).sum())
        masks[n] = masks[n].float()
    rep = artifact.export(ck, tmp_path / "vgg.etz")
    assert rep["outside_mask"] == {n: k for n, k in outside.items() if k}
    back = artifact.load(tmp_path / "vgg.etz")
    for n, m in masks.items():
        w = back["model_state_dict"][n]
        assert not bool(((w != 0) & (m == 0)).any()), n
        assert torch.equal(w[m.bool()], ck["model_state_dict"][n][m.bool()]), n  # kept values exact
    ratio = 8 * rep["weights_bytes"] / artifact.floor_bits(ck)["weights_bits"]
    assert 1.0 <= ratio <= 1.15, ratio
    dense = 4 * sum(v.numel() for k, v in ck["model_state_dict"].items() if k.endswith(".weight"))
    assert rep["bytes"] < dense / 10
    torch.save(ck, tmp_path / "release.pt")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "release.pt"), "--out", str(tmp_path / "cli.etz")]) == 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"elastictrain: warning: {tmp_path / 'release.pt'}: "
                                              f"{sum(outside.values()):,} non-zero weights in "), err
