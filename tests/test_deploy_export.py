"""Deployed models in standard formats: BatchNorm folding, .pt2 and .onnx read back in an interpreter
that cannot import elastictrain (torch.export.load, onnxruntime; batch 1 and 5), ``elastictrain
deploy`` end to end with its bad input, and ``elastictrain eval`` of the deployed files."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch import nn

from elastictrain import checkpoint
from elastictrain.config import ConfigError
from elastictrain.constraints.topk import keep_count
from elastictrain.deploy import export as ex
from elastictrain.models import build_model
from pipeline.cli import main

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
TOL = 1e-4
# filters zeroed in each model: layer -> output channels (shrink removes them and their BN entries)
ZEROED = {"smallcnn": {"features.0": [1, 4, 5, 30], "features.3": list(range(8, 40))},
          "vggcpu": {"features.0": [0, 2, 3], "features.3": list(range(20)), "features.10": list(range(100, 200))}}


def _shrink():
    try:
        from elastictrain.deploy import shrink
    except ImportError as e:
        pytest.skip(f"elastictrain.deploy.shrink is not importable yet ({e})")
    return shrink


def _pruned(name: str, seed: int = 0) -> nn.Module:
    """``name`` with some filters zeroed and BatchNorm in eval mode with random statistics."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, in_channels=1)
    with torch.no_grad():
        for layer, channels in ZEROED[name].items():
            model.get_submodule(layer).weight[channels] = 0
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return model.eval()


def _kept_filters(kept: list) -> list[int]:
    """Channels of the zero filters a shrink report says stayed (its entries as objects or as JSON)."""
    get = lambda k, f: k[f] if isinstance(k, dict) else getattr(k, f)
    return [get(k, "channel") for k in kept if get(k, "role") == "filter"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --- BatchNorm folding -------------------------------------------------------------------------

class _Mixed(nn.Module):
    """conv→BN (folded), conv+bias→BN (folded), BN after a ReLU and BN of a conv read twice (both kept)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d(6)
        self.b3 = nn.BatchNorm2d(6)
        self.c4, self.b4 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.b3(torch.relu(self.b2(self.c2(self.b1(self.c1(x))))))
        z = self.c4(y)
        return (self.b4(z) + z).mean((2, 3))


def test_fold_batchnorm_is_exact_and_folds_only_conv_outputs():
    torch.manual_seed(0)
    model = _Mixed()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 1)
                m.running_var.uniform_(0.1, 3.0)
                m.weight.normal_(1, 0.5)
                m.bias.normal_(0, 0.5)
    model.eval()
    folded = ex.fold_batchnorm(model)
    kept = sorted(n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d))
    assert kept == ["b3", "b4"]
    assert folded.c1.bias is not None and model.c1.bias is None  # the caller's model is untouched
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        ref = model(x)
        assert _max_diff(folded(x), ref) <= 1e-5 * max(1.0, float(ref.abs().max()))


# --- the formats, read back without elastictrain ------------------------------------------------

FRESH = r"""
import sys
try:
    import elastictrain
except ImportError:
    pass
else:
    sys.exit("elastictrain is importable in the fresh interpreter")
import onnxruntime as ort
import torch

inputs, out, files = torch.load(sys.argv[1]), {}, sys.argv[3:]
for f in files:
    if f.endswith(".pt2"):
        run = torch.export.load(f).module()
    else:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
        s = ort.InferenceSession(f, opts, providers=["CPUExecutionProvider"])
        run = lambda x, s=s: torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        out[f] = {k: run(x) for k, x in inputs[f].items()}
torch.save(out, sys.argv[2])
"""


def _fresh_run(tmp: Path, inputs: dict, files: list[Path]) -> dict:
    """Each file's outputs on its ``inputs[str(file)]``, computed by ``python -I -S`` from a scratch folder with only
    the interpreter's site-packages on its path (no .pth files: the editable install stays out)."""
    torch.save(inputs, tmp / "inputs.pt")
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    code = f"import sys; sys.path += {site!r}\n" + FRESH
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(tmp / "inputs.pt"), str(tmp / "out.pt"),
                        *map(str, files)], cwd=tmp, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(tmp / "out.pt")


# the zoo models the deploy targets name, filter-pruned as a coupled training stage leaves them
COUPLED = {"vgg16": "classifier.weight", "resnet56": "fc.weight", "mobilenetv2": "classifier.weight"}


def _coupled(name: str) -> nn.Module:
    """``name`` (1 channel in) with every coupled channel group pruned 4× at once, BatchNorm entries
    of the pruned channels held at 0 (the followers a stage masks), trained-looking statistics."""
    from test_coupled import apply_with_constrainer, coupled_spec, randomize_bn

    from elastictrain.compress import compress_state_dict
    from elastictrain.deploy import coupling

    torch.manual_seed(0)
    model = build_model(name, 10, 1).eval()
    randomize_bn(model, 1)
    cp = coupling(model, torch.zeros(1, 1, 32, 32))
    result = compress_state_dict(dict(model.state_dict()), coupled_spec(COUPLED[name]), couplings=cp.groups)
    assert result.violations == []
    apply_with_constrainer(model, result.plans, cp)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """SmallCNN and VGG-CPU (filters zeroed), VGG16, ResNet-56 and MobileNetV2 (coupled filter
    pruning): shrunk, BN folded, exported to .pt2 and .onnx, run in a fresh interpreter."""
    shrink = _shrink()
    tmp = tmp_path_factory.mktemp("exported")
    models, info, files, inputs = {}, {}, [], {}
    torch.manual_seed(1)
    for name in [*ZEROED, *COUPLED]:
        model, side = (_pruned(name), 28) if name in ZEROED else (_coupled(name), 32)
        example = torch.randn(1 if name == "vggcpu" else 2, 1, side, side)  # batch 1: exported at 2, still dynamic
        small, report = shrink(model, example)
        folded = ex.fold_batchnorm(small)
        ep = ex.program(folded, example, name)
        info[name] = {"report": report, "ep": ep,
                      "torch": ex.export_pt2(folded, example, tmp / f"{name}.pt2", name, ep=ep),
                      "onnx": ex.export_onnx(folded, example, tmp / f"{name}.onnx", name, ep=ep)}
        models[name] = model
        batches = {"b1": torch.randn(1, 1, side, side), "b5": torch.randn(5, 1, side, side)}
        for fmt in ("pt2", "onnx"):
            files.append(tmp / f"{name}.{fmt}")
            inputs[str(files[-1])] = batches
    return models, info, inputs, _fresh_run(tmp, inputs, files), tmp


@pytest.mark.parametrize("name", list(ZEROED))
def test_formats_match_the_masked_model_in_a_fresh_interpreter(exported, name):
    models, info, inputs, outputs, tmp = exported
    assert info[name]["onnx"]["exporter"] in ("dynamo", "torchscript") and info[name]["onnx"]["opset"] >= 17
    rep = info[name]["report"]
    assert rep.params_after < rep.params_before and rep.macs_after < rep.macs_before  # physically smaller
    first = rep.layer("features.0")  # each zero filter goes, or stays with a reason (its constant meets padding)
    stays = _kept_filters(first.kept)
    assert set(stays) < set(ZEROED[name]["features.0"])
    assert first.shape_after[0] == first.shape_before[0] - len(ZEROED[name]["features.0"]) + len(stays)
    _same_outputs(models[name], name, inputs, outputs, tmp)
    # BN folded away: the exported graph runs convs, not batch norms
    assert not any("batch_norm" in str(n.target) for n in info[name]["ep"].graph.nodes)


@pytest.mark.parametrize("name", list(COUPLED))
def test_coupled_zoo_models_deploy_whole_and_match_in_a_fresh_interpreter(exported, name):
    """Every pruned channel leaves (nothing kept back), each deployed layer is exactly 1/4 as wide
    (the classifier's inputs too), the MACs fall about 4×, and the files match the masked model."""
    models, info, inputs, outputs, tmp = exported
    rep, model = info[name]["report"], models[name]
    assert [k for layer in rep.layers for k in layer.kept] == []
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert rep.layer(n).shape_after[0] == keep_count(m.out_channels, 4), n  # each coupled group kept 1/4
    assert rep.macs_before / rep.macs_after > 3.5
    _same_outputs(model, name, inputs, outputs, tmp)


def _same_outputs(model: nn.Module, name: str, inputs: dict, outputs: dict, tmp: Path) -> None:
    for fmt in ("pt2", "onnx"):
        f = str(tmp / f"{name}.{fmt}")
        for key, x in inputs[f].items():  # batch 1 and 5 through one file: the batch dimension is dynamic
            with torch.no_grad():
                ref = model(x)
            assert outputs[f][key].shape == ref.shape
            assert _max_diff(outputs[f][key], ref) <= TOL, (name, fmt, key)
            assert torch.equal(outputs[f][key].argmax(1), ref.argmax(1)), (name, fmt, key)  # the same top-1


class _Branchy(nn.Module):
    def forward(self, x):
        return x.flatten(1) if x.sum() > 0 else -x.flatten(1)  # control flow on data: torch.export refuses it


def test_untraceable_model_and_unfitting_input_are_config_errors():
    with pytest.raises(ConfigError, match="branchy.pt: torch.export cannot export"):
        ex.program(_Branchy(), torch.randn(2, 3), "branchy.pt")
    with pytest.raises(ConfigError, match=r"here: input 3×28×28 does not fit the model \(at features\.0, Conv2d: "):
        ex.check_input(build_model("smallcnn", in_channels=1), torch.randn(1, 3, 28, 28), "here")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter announces its own retirement
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # … and that it records one branch
def test_onnx_falls_back_to_the_torchscript_exporter_and_says_so(tmp_path):
    import onnxruntime as ort

    x = torch.rand(2, 3) + 0.1  # the branch the TorchScript tracer records
    res = ex.export_onnx(_Branchy(), x, tmp_path / "b.onnx")
    assert res["exporter"] == "torchscript" and res["opset"] == 17 and res["fallback_because"].startswith("dynamo:")
    s = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    assert s.get_inputs()[0].shape == ["batch", 3]
    x5 = torch.rand(5, 3)
    assert _max_diff(torch.from_numpy(s.run(None, {"x": x5.numpy()})[0]), x5) == 0


# --- elastictrain deploy and eval ---------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A SmallCNN checkpoint (elastictrain init) with some filters zeroed, as training leaves them."""
    path = tmp_path_factory.mktemp("ckpt") / "smallcnn.pt"
    assert main(["init", "smallcnn", "--in-channels", "1", "--out", str(path)]) == 0
    ck = checkpoint.load(path)
    model = _pruned("smallcnn")
    ck["model_state_dict"] = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint.atomic_save(ck, path)
    return path


@pytest.fixture(scope="module")
def deployed(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "smallcnn"
    assert main(["deploy", str(ckpt), "--out", str(out)]) == 0
    return out


def test_deploy_runtime_format_is_tuned_here_and_keeps_top1(ckpt, tmp_path, capsys):
    """``--format runtime``: each layer's implementation measured on this machine (deploy.json says
    which and how fast each candidate was), the .runtime.pt2 read back by eval with the same top-1."""
    out = tmp_path / "rt"
    assert main(["deploy", str(ckpt), "--out", str(out), "--format", "runtime", "--tune-batch", "8"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["deploy.json", "model.runtime.pt2"]
    rep = json.loads((out / "deploy.json").read_text())
    assert rep["max_abs_logit_diff"]["runtime"] <= TOL
    tuned = rep["runtime"]
    assert tuned["batch"] == 8 and len(tuned["layers"]) == 4  # SmallCNN: 2 convs, 2 linears
    for layer in tuned["layers"]:
        assert "dense" in layer["ms"] and layer["impl"] == min(layer["ms"], key=layer["ms"].get)
    if FMNIST.is_file():  # the same top-1 from the checkpoint, the .runtime.pt2 and `eval --runtime`
        lines = []
        for args in ([str(ckpt)], [str(out / "model.runtime.pt2")], [str(ckpt), "--runtime", "--batch-size", "16"]):
            assert main(["eval", *args, "--data", "fashion-mnist", "--limit-test", "300"]) == 0
            printed = capsys.readouterr().out
            lines.append([l for l in printed.splitlines() if l.startswith("top-1")][-1].split(" on ")[0])
        assert lines[0] == lines[1] == lines[2]
        assert "[eval] runtime: " in printed and "tuned at batch 16" in printed


def test_deploy_writes_both_formats_and_its_report(deployed):
    assert sorted(p.name for p in deployed.iterdir()) == ["deploy.json", "model.onnx", "model.pt2"]
    assert not [p for p in deployed.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    rep = json.loads((deployed / "deploy.json").read_text())
    assert rep["input_shape"] == [1, 28, 28] and rep["model"] == "smallcnn"
    assert set(rep["formats"]) == {"torch", "onnx"} and rep["formats"]["onnx"]["opset"] >= 17
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(deployed / "model.onnx")).graph
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", 1, 28, 28]
    assert all(0 <= d <= TOL for d in rep["max_abs_logit_diff"].values()), rep["max_abs_logit_diff"]
    first = {l["name"]: l for l in rep["shrink"]["layers"]}["features.0"]
    stays = _kept_filters(first["kept"])
    assert first["shape_after"][0] == 32 - len(ZEROED["smallcnn"]["features.0"]) + len(stays) < 32
    assert rep["shrink"]["params_after"] < rep["shrink"]["params_before"]


def test_deploy_from_etz_replaces_an_earlier_deploy_whole(ckpt, tmp_path, capsys):
    etz, out = tmp_path / "m.etz", tmp_path / "out"
    assert main(["export", str(ckpt), "--out", str(etz)]) == 0
    assert main(["deploy", str(etz), "--out", str(out), "--format", "torch"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["deploy.json", "model.pt2"]
    assert main(["deploy", str(etz), "--out", str(out), "--format", "onnx", "--input-shape", "1,32,32"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["deploy.json", "model.onnx"]  # nothing of the first left
    rep = json.loads((out / "deploy.json").read_text())
    assert rep["input_shape"] == [1, 32, 32] and rep["max_abs_logit_diff"]["onnx"] <= TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.etz", "out"]


@pytest.mark.skipif(not FMNIST.is_file(), reason="no Fashion-MNIST (apt-get install dataset-fashion-mnist)")
def test_eval_of_deployed_files_prints_the_checkpoints_top1(ckpt, deployed, capsys):
    def top1(path) -> str:
        assert main(["eval", str(path), "--data", "fashion-mnist", "--limit-test", "300", "--batch-size", "128"]) == 0
        line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("top-1")][-1]
        return re.match(r"top-1 (\S+)\s+top-5 (\S+) on 300 test images", line).groups()

    reference = top1(ckpt)
    assert top1(deployed / "model.pt2") == reference
    assert top1(deployed / "model.onnx") == reference


@pytest.mark.parametrize("flags, message", [
    (["--format", "torch,tflite"], r"--format: unknown format 'tflite'"),
    (["--input-shape", "3,28,28"], r"smallcnn.pt: --input-shape: input 3×28×28 does not fit the model"),
    (["--input-shape", "28,28"], r"--input-shape: expected C,H,W"),
    (["--align", "0"], r"--align: expected a positive integer, got 0"),
    (["--format", "runtime", "--tune-batch", "0"], r"--tune-batch: expected a positive integer, got 0"),
    (["--format", "runtime,tflite"], r"--format: unknown format 'tflite'"),
])
def test_bad_input_is_one_line_and_writes_nothing(ckpt, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["deploy", str(ckpt), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("elastictrain: error: ") and re.search(message, err), err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging folder beside it


def test_deploy_refuses_a_folder_that_is_not_a_deploy(ckpt, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["deploy", str(ckpt), "--out", str(tmp_path), "--format", "torch"]) == 2
    assert "is not an earlier deploy folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_eval_runtime_needs_data_and_no_attacks(ckpt, capsys):
    for extra in ([], ["--data", "fashion-mnist", "--attacks", "fgsm"]):
        assert main(["eval", str(ckpt), "--runtime", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--runtime: evaluates accuracy on --data, without --attacks" in err, err
