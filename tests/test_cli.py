"""The `elastictrain` command end to end: every example spec on VGG16, verify, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elastictrain.models import build_model
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "configs" / "specs").glob("*.yaml"))
BUFFERS = {"weight_mask", "pre_weight_mask", "structured_weight_mask", "pre_structured_weight_mask",
           "quantization_table"}


def _init(tmp_path_factory, name, **kw):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(name) / f"{name}.pt"
    torch.save({"model_state_dict": build_model(name, **kw).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def vgg16(tmp_path_factory):
    return _init(tmp_path_factory, "vgg16")


@pytest.fixture(scope="module")
def lenet5(tmp_path_factory):
    return _init(tmp_path_factory, "lenet5", in_channels=1)


@pytest.fixture(scope="module")
def smallcnn(tmp_path_factory):
    return _init(tmp_path_factory, "smallcnn", in_channels=1)


@pytest.fixture(scope="module")
def vggcpu(tmp_path_factory):
    return _init(tmp_path_factory, "vggcpu", in_channels=1)


def test_example_specs_exist():
    names = {p.stem for p in SPECS}
    for row in ["50x-unstructured", "500x-unstructured", "1000x-unstructured", "100x-kernel", "500x-kernel",
                "8000x-1000x-4bit", "16000x-1000x-2bit-64cb", "pattern", "balanced"]:
        assert f"vgg16-{row}" in names


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_compress_every_example_spec_and_verify(request, spec, tmp_path, capsys):
    model = spec.stem.split("-")[0]  # every example spec is named after the model it is for
    vgg16 = request.getfixturevalue(model)
    out, rep_path = tmp_path / "c.pt", tmp_path / "c.json"
    assert main(["compress", str(vgg16), "--spec", str(spec), "--out", str(out), "--report", str(rep_path),
                 "--quiet"]) == 0
    assert main(["verify", str(out), "--spec", str(spec)]) == 0
    assert "all constraints hold" in capsys.readouterr().out
    ck = torch.load(out, weights_only=True)
    assert (BUFFERS <= set(ck["elastic_trainer_state_dict"]["model_buffers_state_dict"])
            and ck["local_dict"]["epoch"] == 0)
    sd = ck["model_state_dict"]
    masks = ck["elastic_trainer_state_dict"]["model_buffers_state_dict"]["weight_mask"]
    for name, m in masks.items():  # compression is baked in: masked entries are exactly 0
        assert not sd[name][~m].any()
    rep = json.loads(rep_path.read_text())
    layers = [v for v in sd.values() if v.dim() in (2, 4)]
    assert rep["total_params"] == sum(v.numel() for v in layers)
    assert rep["nonzeros"] == sum(int((v != 0).sum()) for v in layers)  # independent recount
    assert {"name", "params", "nonzeros"} <= set(rep["layers"][0])
    expected = {"vgg16-50x-unstructured": 50, "vgg16-500x-unstructured": 500, "vgg16-1000x-unstructured": 1000}
    if spec.stem in expected:
        assert rep["pruning_ratio"] == pytest.approx(expected[spec.stem], rel=0.01)
    if spec.stem == "vgg16-16000x-1000x-2bit-64cb":
        assert rep["nominal_compression"] == pytest.approx(16000, rel=0.01)
        books = ck["elastic_trainer_state_dict"]["model_buffers_state_dict"]["quantization_table"]
        assert all(b.shape == (64, 4) for b in books.values())
        for name, w in sd.items():
            if name in books:
                assert w[w != 0].unique().numel() <= 64 * 4


def test_verify_names_the_broken_layer(vgg16, tmp_path, capsys):
    spec = ROOT / "configs" / "specs" / "vgg16-balanced.yaml"
    out = tmp_path / "c.pt"
    assert main(["compress", str(vgg16), "--spec", str(spec), "--out", str(out), "--quiet"]) == 0
    ck = torch.load(out, weights_only=True)
    w = ck["model_state_dict"]["features.10.weight"]
    w.view(-1)[(w.view(-1) == 0).nonzero()[0]] = 0.5  # one pruned weight comes back
    tampered = tmp_path / "tampered.pt"  # (written by another tool: no content hash beside it)
    torch.save(ck, tampered)
    assert main(["verify", str(tampered), "--spec", str(spec)]) == 1
    text = capsys.readouterr().out
    assert "FAIL features.10.weight: rules[1].balance: kept units per workload differ" in text


def run_cli(*args):
    exe = Path(sys.executable).with_name("elastictrain")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def test_bad_spec_one_line_error_and_nothing_written(vgg16, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - match: 'features.*.weight'\n    layer: conv\n    quantize: {bits: 9}\n")
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    r = run_cli("compress", str(vgg16), "--spec", str(bad), "--out", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert f"{bad}: rules[0].quantize.bits: must be 1..8 (got 9)" in r.stderr
    assert out.read_bytes() == b"precious"


def test_missing_and_unsafe_checkpoints_are_refused(tmp_path):
    spec = ROOT / "configs" / "specs" / "vgg16-50x-unstructured.yaml"
    r = run_cli("compress", str(tmp_path / "nope.pt"), "--spec", str(spec), "--out", str(tmp_path / "o.pt"))
    assert r.returncode == 2 and "nope.pt: no such checkpoint" in r.stderr
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    code = (f"import torch, os\nclass E:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n"
            f"torch.save({{'model_state_dict': {{'w': torch.zeros(2, 2)}}, 'x': E()}}, '{evil}')\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    r = run_cli("compress", str(evil), "--spec", str(spec), "--out", str(tmp_path / "o.pt"))
    assert r.returncode == 2 and "evil.pt: not a readable checkpoint" in r.stderr
    assert not marker.exists()  # the pickled callable never ran
    assert not (tmp_path / "o.pt").exists()
