"""``elastictrain deploy``: a checkpoint or ``.etz`` → a physically smaller model in standard formats.

checkpoint → model (as ``eval`` builds it) → trial forward at the input shape → ``shrink`` (pruned
channels removed) → BatchNorm folded into convs → ``model.pt2`` / ``model.onnx`` → each file read
back and run on the example batch → ``deploy.json`` (the shrink report, formats, input shape, the
largest logit difference of every file against the checkpoint's model). All of it is written into
a temporary folder renamed to ``--out`` at the end; bad input is one line and nothing written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from elastictrain import checkpoint
from elastictrain.config import ConfigError
from elastictrain.deploy import export as ex
from elastictrain.files import json_safe, write_json

from .evaluate import EvalRequest, load_any, model_for

FORMAT = "elastictrain.deploy/1"
SIDES = {"fashion-mnist": 28, "mnist": 28, "cifar10": 32, "cifar100": 32, "imagefolder": 224}
EXAMPLE_BATCH = 4
TOLERANCE = 1e-4  # max abs logit difference, relative to max(1, largest logit)


@dataclass
class DeployRequest:
    path: Path
    out: Path
    formats: str = "torch,onnx"
    input_shape: Optional[str] = None
    """C,H,W; default: the checkpoint's data set's image size (28 → 32 when the model needs padding)."""
    model: Optional[str] = None
    """model name for checkpoints that record none."""
    align: int = 1
    """keep every channel group's width a multiple of this (see ``shrink``)."""
    tune_batch: int = 64
    """the batch size the runtime format is tuned for."""


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = [p.strip() for p in text.replace("×", ",").replace("x", ",").split(",")]
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--input-shape: expected C,H,W (three positive integers), got {text!r}")
    return tuple(int(p) for p in parts)


def _candidates(ckpt: dict, model: torch.nn.Module) -> tuple[list[tuple[int, int, int]], str]:
    """Input shapes to try when none is given, and where they come from."""
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    channels = ckpt.get("in_channels") or (first.in_channels if first is not None else 3)
    data = _data_name(ckpt)
    if data in SIDES:
        side, origin = SIDES[data], f"the checkpoint's data set ({data})"
    else:  # (init and the seed's checkpoints record none) MNIST-like for gray images, CIFAR-like else
        side, origin = (28 if channels == 1 else 32), f"a default for {channels}-channel images"
    return [(channels, side, side)] + ([(channels, 32, 32)] if side == 28 else []), origin


def _data_name(ckpt: dict) -> Optional[str]:
    """The data set a stage's checkpoint was trained on (its report records it)."""
    report = ckpt.get("report")
    return report.get("data") if isinstance(report, dict) else None


def _example(shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.randn(EXAMPLE_BATCH, *shape, generator=torch.Generator().manual_seed(0))


def _fitting_input(model, ckpt: dict, req: DeployRequest) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The example batch, the model's logits on it, and where its shape came from."""
    where = f"{req.path}: --input-shape"
    if req.input_shape is not None:
        x = _example(parse_shape(req.input_shape))
        return x, ex.check_input(model, x, where), "--input-shape"
    shapes, origin = _candidates(ckpt, model)
    for i, shape in enumerate(shapes):
        x = _example(shape)
        try:
            return x, ex.check_input(model, x, where), origin + (" (zero-padded to 32)" if i else "")
        except ConfigError as e:
            if i == len(shapes) - 1:
                raise ConfigError(f"{e} (shape from {origin}; pass --input-shape C,H,W)") from None
    raise AssertionError("unreachable")


def run_deploy(req: DeployRequest, log=print) -> dict:
    """Everything ``elastictrain deploy`` writes to ``deploy.json``, as a dict."""
    from elastictrain.deploy import UntraceableModel, shrink
    from elastictrain.measure.accounting import report as accounting

    formats = ex.parse_formats(req.formats)  # flags first: before any tensor is read
    if req.align < 1:
        raise ConfigError(f"--align: expected a positive integer, got {req.align}")
    if req.tune_batch < 1:
        raise ConfigError(f"--tune-batch: expected a positive integer, got {req.tune_batch}")
    ex.check_out(req.out)
    if req.input_shape is not None:
        parse_shape(req.input_shape)
    ckpt = load_any(req.path)
    sd = checkpoint.model_state(ckpt, str(req.path))
    nominal = accounting({k: v for k, v in sd.items() if torch.is_floating_point(v)},
                         checkpoint.plans(ckpt, str(req.path)))  # the ratios on paper, beside the realized ones
    model = model_for(ckpt, sd, EvalRequest(req.path, model=req.model)).eval()
    x, reference, origin = _fitting_input(model, ckpt, req)
    try:
        small, report = shrink(model, x, align=req.align)
    except UntraceableModel as e:
        raise ConfigError(f"{req.path}: the model cannot be traced for deploy ({e})") from None
    folded = ex.fold_batchnorm(small)
    ep = ex.program(folded, x, str(req.path))
    diffs = {"shrunk": _diff(small, x, reference), "folded": _diff(folded, x, reference)}
    files, tuning = {}, None
    with ex.staged_dir(req.out) as tmp:
        for f in formats:
            if f == "runtime":
                from elastictrain.runtime import tuned

                rt, tuning = tuned(folded, x, req.tune_batch)
                files[f] = ex.export_pt2(rt, x, tmp / ex.FILES[f], str(req.path))
            else:
                write = ex.export_pt2 if f == "torch" else ex.export_onnx
                files[f] = write(folded, x, tmp / ex.FILES[f], str(req.path), ep=ep)
            diffs[f] = _diff(ex.Deployed(tmp / ex.FILES[f]), x, reference)
        scale = max(1.0, float(reference.abs().max()))
        worst = max(diffs, key=diffs.get)
        if not diffs[worst] <= TOLERANCE * scale:  # an invariant of shrink / fold / export, not a user error
            raise RuntimeError(f"deploy: the {worst} model's logits differ from the checkpoint's by "
                               f"{diffs[worst]:.3g}; this is a bug in elastictrain.deploy")
        shrunk = report.to_dict() if hasattr(report, "to_dict") else dict(report)
        out = {"format": FORMAT, "source": str(req.path), "model": req.model or ckpt.get("model"),
               "data": _data_name(ckpt), "input_shape": list(x.shape[1:]), "align": req.align,
               "input_shape_from": origin, "example_batch": EXAMPLE_BATCH, "formats": files,
               "max_abs_logit_diff": diffs, "nominal_compression": nominal["nominal_compression"],
               "pruning_ratio": nominal["pruning_ratio"], "shrink": shrunk}
        if tuning is not None:
            out["runtime"] = tuning.to_dict()
        write_json(json_safe(out), tmp / ex.MANIFEST)  # last: a folder with it is a whole deploy
    log(report.table() if hasattr(report, "table") else str(shrunk))
    log(f"wrote {req.out}: " + ", ".join(
        f"{v['file']} ({v['bytes']:,} bytes, {v['exporter']})" for v in files.values())
        + f", {ex.MANIFEST}; input {'×'.join(map(str, x.shape[1:]))} from {origin}")
    log("max |Δ logits| vs the checkpoint's model: " + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
    return out


def _diff(model, x: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - reference).abs().max())
