"""``elastictrain eval``: a final checkpoint on one device — accuracy, robust accuracy, compression.

Reads this project's checkpoints, the research release's (``model_state_dict`` +
``elastic_trainer_state_dict.model_buffers_state_dict`` + ``local_dict``: compression baked into
the weights), packed ``.etz`` artifacts and, for accuracy alone, deployed ``.pt2`` / ``.onnx`` models
(``elastictrain deploy``). Checkpoints load with ``weights_only=True`` only: a file
that needs arbitrary unpickling is refused before any of it runs. No Ray, DeepSpeed or cluster.

Without data it reports compression alone (inspecting a checkpoint needs no data set). The model
comes from the checkpoint (``model``, ``num_classes``, ``in_channels``, as stages record them) or
from ``--model``; classes and channels are otherwise read off the weights' shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from elastictrain import checkpoint
from elastictrain.config import ConfigError
from elastictrain.constraints.plan import layer_kind
from elastictrain.deploy.export import SUFFIXES, Deployed
from elastictrain.files import write_json


@dataclass
class EvalRequest:
    path: Path
    model: Optional[str] = None
    data: Optional[str] = None
    data_root: Optional[str] = None
    pad_to: Optional[int] = None
    limit_test: Optional[int] = None
    batch_size: int = 512
    device: str = "auto"
    attacks: list = field(default_factory=list)
    attack_images: Optional[int] = 1000
    unit: Optional[str] = None
    balance: Optional[str] = None
    groups: Optional[str] = None
    rename: list = field(default_factory=list)
    """(old, new) parameter-name fragments, e.g. ("shortcut.", "downsample."), for checkpoints whose
    model definition names layers differently from ours."""
    json: Optional[Path] = None
    plots: Optional[Path] = None
    runtime: bool = False
    """evaluate the model as ``deploy --format runtime`` runs it (shrunk, folded, each layer's
    fastest exact implementation, tuned here at min(batch size, 64))."""


def load_any(path: Path) -> dict:
    """A checkpoint dict from a ``.pt`` checkpoint (ours or the seed's) or a ``.etz`` artifact."""
    if path.suffix == ".etz":
        from elastictrain import artifact

        if not path.is_file():
            raise ConfigError(f"{path}: no such artifact")
        try:
            return artifact.load(path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return checkpoint.load(path)


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda asked for, but no GPU is visible")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_for(ckpt: dict, sd: dict, req: EvalRequest, bundle=None):
    """The checkpoint's model with its weights (ConfigError when they do not fit it or ``bundle``'s data)."""
    from elastictrain.models import build_model

    name = req.model or ckpt.get("model")
    if not name:
        raise ConfigError(f"{req.path}: the checkpoint records no model name; pass --model (e.g. vgg16)")
    convs = [v for v in sd.values() if v.dim() == 4]
    linears = [v for v in sd.values() if v.dim() == 2]
    classes = ckpt.get("num_classes") or (linears[-1].shape[0] if linears else None)
    channels = ckpt.get("in_channels") or (convs[0].shape[1] if convs else None)
    if bundle is not None:
        classes, channels = classes or bundle.num_classes, channels or bundle.in_channels
    model = build_model(name, num_classes=classes, in_channels=channels)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ConfigError(f"{req.path}: weights do not fit model {name!r} "
                          f"({what}{' …' if len(missing or unexpected) > 3 else ''})")
    if bundle is not None and (classes, channels) != (bundle.num_classes, bundle.in_channels):
        raise ConfigError(f"{req.path}: the model maps {channels}-channel images to {classes} classes; "
                          f"{req.data} has {bundle.in_channels}-channel images of {bundle.num_classes} classes")
    return model


def _packed(path: Path, ckpt: dict) -> dict:
    """The packed artifact's bytes and honest ratio (exported to a scratch file for a checkpoint)."""
    import tempfile

    from elastictrain import artifact

    with tempfile.TemporaryDirectory() as tmp:  # (an .etz re-exports to the same sizes)
        info = artifact.export(ckpt, Path(tmp) / "m.etz")
    if path.suffix == ".etz":
        info["bytes"] = path.stat().st_size
    return {"artifact_bytes": info["bytes"], "artifact_weights_bytes": info["weights_bytes"],
            "honest_compression": info["honest_compression"], "artifact_model_compression": info["model_compression"]}


def _renamed(d: dict, rename: list) -> dict:
    out = {}
    for k, v in d.items():
        for old, new in rename:
            k = k.replace(old, new)
        out[k] = v
    return out


def parse_rename(text: str) -> list[tuple[str, str]]:
    """``"shortcut.=downsample.,linear.=fc."`` → [("shortcut.", "downsample."), ("linear.", "fc.")]."""
    pairs = []
    for item in (t for t in text.split(",") if t.strip()):
        old, sep, new = item.partition("=")
        if not sep or not old.strip():
            raise ConfigError(f"--rename: expected OLD=NEW pairs separated by commas (got {item!r})")
        pairs.append((old.strip(), new.strip()))
    return pairs


def _load_data(req: EvalRequest):
    from elastictrain.data import DataConfig
    from elastictrain.data import load as load_data

    data = DataConfig(name=req.data, root=req.data_root, pad_to=req.pad_to, limit_test=req.limit_test,
                      eval_batch_size=req.batch_size)
    try:
        return data, load_data(data)
    except ValueError as e:  # a missing folder or a malformed file, named by the reader
        raise ConfigError(str(e)) from None


def _eval_deployed(req: EvalRequest, log) -> dict:
    """Top-1 / top-5 of a deployed ``.pt2`` (torch) or ``.onnx`` (onnxruntime, CPU, 2 threads)."""
    from elastictrain.data.loader import make_test_loader
    from elastictrain.progress import Progress
    from elastictrain.train import evaluate

    if req.data is None:
        raise ConfigError(f"{req.path}: a deployed model is evaluated on test images; pass --data")
    stats = [f for f in ("attacks", "unit", "balance", "groups", "rename", "plots", "model") if getattr(req, f)]
    if stats:  # compression statistics, attacks and renames need the checkpoint's weights and masks
        raise ConfigError(f"--{stats[0].replace('_', '-')}: not for a deployed model ({req.path.name}); "
                          "pass the checkpoint it was deployed from")
    if SUFFIXES[req.path.suffix] == "onnx" and req.device == "cuda":
        raise ConfigError("--device cuda: an .onnx model is evaluated with onnxruntime on the CPU")
    device = _device(req.device) if SUFFIXES[req.path.suffix] == "torch" else torch.device("cpu")
    model = Deployed(req.path, device)
    data, bundle = _load_data(req)
    image = (bundle.in_channels, bundle.image_size, bundle.image_size)
    if model.input_shape != image:
        raise ConfigError(f"{req.path}: deployed for {'×'.join(map(str, model.input_shape))} images; {req.data} "
                          f"gives {'×'.join(map(str, image))} here (set --pad-to to match)")
    acc = evaluate(model, make_test_loader(bundle, data, device), progress=Progress("auto", log, prefix="[eval] "))
    out = {"checkpoint": str(req.path), "format": model.format, **acc}
    log(f"top-1 {out['top1']:.2%}  top-5 {out['top5']:.2%} on {out['test_images']} test images ({device})")
    if req.json is not None:
        write_json(out, req.json)
    return out


def _runtime_model(model, bundle, req: EvalRequest, device, log):
    """``model`` as the deploy runtime runs it, and the tuning (each layer's choice and timings)."""
    from elastictrain.deploy import shrink
    from elastictrain.deploy.export import fold_batchnorm
    from elastictrain.runtime import tuned

    x = torch.randn(1, bundle.in_channels, bundle.image_size, bundle.image_size, device=device)
    small, _ = shrink(model.eval(), x)
    rt, tuning = tuned(fold_batchnorm(small), x, min(req.batch_size, 64))
    impls = [c.impl for c in tuning.layers]
    log(f"[eval] runtime: {', '.join(f'{impls.count(i)} {i}' for i in dict.fromkeys(impls))} layers "
        f"(tuned at batch {tuning.batch}, {tuning.threads} threads)")
    return rt, tuning.to_dict()


def run_eval(req: EvalRequest, log=print) -> dict:
    """Everything ``elastictrain eval`` prints, as a dict (also written to ``req.json``)."""
    from elastictrain.measure.structure import format_summary, summary

    if req.path.suffix in SUFFIXES:
        return _eval_deployed(req, log)
    device = _device(req.device)
    if req.runtime and (req.data is None or req.attacks):
        raise ConfigError("--runtime: evaluates accuracy on --data, without --attacks (the runtime's "
                          "sparse layers compute no gradients)")
    ckpt = load_any(req.path)
    sd = checkpoint.model_state(ckpt, str(req.path))
    if req.rename:
        sd, ckpt = _renamed(sd, req.rename), {**ckpt, "elastic_trainer_state_dict": {"model_buffers_state_dict": {
            k: _renamed(v, req.rename) for k, v in checkpoint.buffers(ckpt).items()}}}
    plans = checkpoint.plans(ckpt, str(req.path))
    out = summary({k: v for k, v in sd.items() if torch.is_floating_point(v)}, plans,
                  unit=req.unit, balance=req.balance, groups=req.groups)
    out = {"checkpoint": str(req.path), "epoch": ckpt.get("local_dict", {}).get("epoch"), **out,
           **_packed(req.path, ckpt)}
    data, bundle = _load_data(req) if req.data is not None else (None, None)
    model = (model_for(ckpt, sd, req, bundle).to(device)
             if bundle is not None or req.model or ckpt.get("model") else None)
    if bundle is not None:
        from elastictrain.data.loader import make_test_loader
        from elastictrain.models.fit import dry_forward
        from elastictrain.progress import Progress
        from elastictrain.train import evaluate
        from elastictrain.train.attacks import robust_accuracy

        image = torch.zeros(2, bundle.in_channels, bundle.image_size, bundle.image_size, device=device)
        dry_forward(model, image, f"{req.path}: model {ckpt.get('model') or req.model} on {req.data}")
        test = make_test_loader(bundle, data, device)
        prog = Progress("auto", log, prefix="[eval] ")
        if req.runtime:
            model, out["runtime"] = _runtime_model(model, bundle, req, device, log)
        acc = evaluate(model, test, progress=prog)
        out.update(top1=acc["top1"], top5=acc["top5"], test_loss=acc["test_loss"], test_images=acc["test_images"])
        out["robust"] = {}
        for a in req.attacks:
            torch.manual_seed(0)  # PGD's random start: the same report twice
            r = robust_accuracy(model, test, a, bundle.mean, bundle.std, req.attack_images, progress=prog)
            out["robust"][a.name] = r["accuracy"]
            out["robust_images"] = r["images"]
            log(f"[eval] {a.name} (eps {a.eps:.4f}): {r['accuracy']:.2%} of {r['images']} images")
    log(format_summary(out))
    log(f"packed artifact: {out['artifact_bytes']:,} bytes — honest ratio {out['honest_compression']:,.1f}× (weights), "
        f"{out['artifact_model_compression']:,.1f}× (whole model) vs nominal {out['nominal_compression']:,.1f}×")
    if bundle is not None:
        log(f"top-1 {out['top1']:.2%}  top-5 {out['top5']:.2%} on {out['test_images']} test images ({device})")
    if req.plots is not None:
        from .plots import density_chart, weight_histograms

        out["plots"] = [str(weight_histograms({n: v for n, v in sd.items() if layer_kind(tuple(v.shape))},
                                              req.plots / "weights.png")),
                        str(density_chart(out, req.plots / "density.png"))]
    if req.json is not None:
        write_json(out, req.json)
    return out
