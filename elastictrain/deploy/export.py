"""A shrunk model written in standard formats: ``torch.export`` (``.pt2``) and ONNX, with a dynamic
batch, and read back for evaluation.

Codebook-quantized weights need no baking step: a checkpoint's ``model_state_dict`` already holds
the effective weights (each one its codebook value), so the exported graphs carry them as plain
fp32 constants. BatchNorm after a conv is folded into the conv's weights and bias
(``fold_batchnorm``): one op fewer per layer at inference, equal to fp32 rounding.

A ``.pt2`` loads with plain torch (``torch.export.load(path).module()``), an ``.onnx`` with
onnxruntime; neither needs ElasticTrain. Files go through ``staged_dir``: a temporary folder
beside the output, renamed into place once everything in it is written, so a half-written
deploy never looks complete. Every user error (a format we do not write, an input that does not
fit, a model that cannot be exported) is a one-line ``ConfigError`` raised before that rename.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from elastictrain.config import ConfigError

# format -> file name in the output folder; "runtime": the model with each layer's fastest exact
# implementation (elastictrain.runtime), a .pt2 whose sparse layers need `import elastictrain.runtime`
FILES = {"torch": "model.pt2", "onnx": "model.onnx", "runtime": "model.runtime.pt2"}
SUFFIXES = {".pt2": "torch", ".onnx": "onnx"}
OPSET = 18  # what torch's dynamo exporter writes natively (no version conversion); any recent onnxruntime runs it
MANIFEST = "deploy.json"  # written last into a deploy folder; one that has it was a complete deploy
_UMASK = os.umask(0)  # read once (it can only be read by setting it), restored at once
os.umask(_UMASK)


def parse_formats(text: str) -> list[str]:
    """``"torch,onnx"`` → ["torch", "onnx"]; a ConfigError names an unknown format or a missing extra."""
    formats = list(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    bad = [f for f in formats if f not in FILES]
    if bad or not formats:
        raise ConfigError(f"--format: unknown format {bad[0]!r} (expected a comma-separated list of "
                          f"{', '.join(FILES)})" if bad else "--format: names no format")
    if "onnx" in formats:
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"--format onnx: needs {', '.join(missing)} (pip install 'elastictrain[deploy]')")
    return formats


def check_input(model: nn.Module, example: torch.Tensor, where: str) -> torch.Tensor:
    """The model's output on ``example`` (eval mode, no grad); ConfigError naming ``where`` when the
    input does not fit the model (``models.fit.dry_forward``) or the output is not logits."""
    from elastictrain.models.fit import dry_forward

    model.eval()
    out = dry_forward(model, example, where)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(f"{where}: the model's output is not a batch × classes tensor of logits")
    return out


def fold_batchnorm(module: nn.Module) -> fx.GraphModule:
    """A copy of ``module`` (eval mode) where each BatchNorm2d that reads the output of a Conv2d, and
    is that output's only reader, is folded into the conv: w' = w·γ/σ, b' = (b − μ)·γ/σ + β."""
    gm = copy.deepcopy(module) if isinstance(module, fx.GraphModule) else fx.symbolic_trace(copy.deepcopy(module))
    gm.eval()
    calls: dict[str, int] = {}  # a module called twice (shared weights) is left alone
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(bn := gm.get_submodule(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(conv := gm.get_submodule(src.target), nn.Conv2d)
                and calls[src.target] == 1 and calls[node.target] == 1 and bn.track_running_stats):
            continue
        fused = fuse_conv_bn_eval(conv, bn)
        # what the weight was and the scale folded into it: elastictrain.runtime keeps a codebook
        # layer's values as codes and applies the scale to each filter's sum (not exported)
        fused.unfolded = (conv.weight.detach(), (bn.weight * torch.rsqrt(bn.running_var + bn.eps)).detach())
        _set_submodule(gm, src.target, fused)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _batched(example: torch.Tensor) -> torch.Tensor:
    # torch.export specializes a dimension whose example size is 1: trace at batch 2 to keep it free
    return example.expand(2, *example.shape[1:]).contiguous() if example.shape[0] == 1 else example


def program(model: nn.Module, example: torch.Tensor, where: str) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` with a dynamic batch; ConfigError naming ``where`` if it fails."""
    model.eval()
    batch = torch.export.Dim("batch")
    try:
        return torch.export.export(model, (_batched(example),), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch.export's many error types: all mean "this model does not export"
        raise ConfigError(f"{where}: torch.export cannot export the model ({type(e).__name__}: {_first_line(e)})") \
            from None


def export_pt2(model: nn.Module, example: torch.Tensor, path: str | Path, where: str = "model",
               ep: torch.export.ExportedProgram | None = None) -> dict:
    """Write ``model`` (or its already exported program ``ep``) as a ``.pt2`` at ``path``."""
    torch.export.save(ep if ep is not None else program(model, example, where), str(path))
    return {"file": Path(path).name, "exporter": "torch.export", "bytes": Path(path).stat().st_size}


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, where: str = "model",
                ep: torch.export.ExportedProgram | None = None) -> dict:
    """Write ``model`` as ONNX (opset ``OPSET``, dynamic batch) at ``path``: the dynamo exporter
    (from ``ep`` when given) first, the TorchScript one if that fails; the result names which ran.
    The file passes ``onnx.checker``."""
    import onnx

    path = Path(path)
    names = {"input_names": ["x"], "output_names": ["logits"]}
    fallback = {}
    try:
        ep = ep if ep is not None else program(model, example, where)
        torch.onnx.export(ep, (_batched(example),), str(path), dynamo=True, opset_version=OPSET, verbose=False,
                          external_data=False, **names)
        exporter = "dynamo"
    except Exception as e:
        fallback["fallback_because"] = f"dynamo: {type(e).__name__}: {_first_line(e)}"
        try:
            torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=17,
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, **names)
            exporter = "torchscript"
        except Exception as e2:
            raise ConfigError(f"{where}: ONNX export failed ({fallback['fallback_because']}; "
                              f"torchscript: {type(e2).__name__}: {_first_line(e2)})") from None
    proto = onnx.load(str(path))
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if batch and batch != "batch":  # the dynamo exporter names it after torch's symbol (s77): say what it is
        for v in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
            for d in v.type.tensor_type.shape.dim:
                if d.dim_param == batch:
                    d.dim_param = "batch"
        onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"file": path.name, "exporter": exporter, "opset": opset, "bytes": path.stat().st_size, **fallback}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def check_out(out: str | Path) -> Path:
    """``out`` when a deploy may be written there: absent, empty, or an earlier deploy (``MANIFEST``)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ConfigError(f"--out {out}: exists and is not an earlier deploy folder (no {MANIFEST} in it)")
    return out


@contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write into; renamed to ``out`` when the block ends
    without an error, removed when it raises. An ``out`` that holds anything but a previous
    deploy (no ``MANIFEST`` in it) is refused before anything is written."""
    out = check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # the mode a plain mkdir gives, not mkdtemp's 0700
    try:
        yield tmp
        for f in tmp.iterdir():  # what a reader sees after the rename is on disk
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if out.exists():  # an earlier deploy: moved aside, replaced, then removed
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Deployed(nn.Module):
    """A deployed ``.pt2`` or ``.onnx`` as a module mapping an image batch to logits (for
    ``elastictrain eval``); ``input_shape`` is the C, H, W it was exported for. ONNX runs in
    onnxruntime on the CPU (``threads`` intra-op threads); a ``.pt2`` on ``device``."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", threads: int = 2):
        super().__init__()
        path = Path(path)
        if path.suffix not in SUFFIXES:
            raise ConfigError(f"{path}: not a deployed model (expected {' or '.join(SUFFIXES)})")
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
        self.path, self.format = path, SUFFIXES[path.suffix]
        try:
            run, self.input_shape = (_load_pt2 if self.format == "torch" else _load_onnx)(path, device, threads)
        except Exception as e:
            raise ConfigError(f"{path}: not a readable {self.format} model ({type(e).__name__}: "
                              f"{_first_line(e)})") from None
        object.__setattr__(self, "_run", run)  # not a submodule: an exported module refuses .eval() / .train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)


def _load_pt2(path: Path, device, threads: int):
    import elastictrain.runtime.ops  # noqa: F401  (registers the operators a runtime .pt2 calls)

    ep = torch.export.load(str(path))
    if torch.device(device).type != "cpu":
        ep = torch.export.passes.move_to_device_pass(ep, torch.device(device))
    x = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == ep.graph_signature.user_inputs[0])
    return ep.module(), tuple(int(d) for d in x.meta["val"].shape[1:])


def _load_onnx(path: Path, device, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    run = lambda x: torch.from_numpy(session.run(None, {inp.name: x.detach().cpu().float().numpy()})[0]).to(x.device)
    return run, tuple(int(d) for d in inp.shape[1:])
