"""Adversarial examples (FGSM, PGD; L∞) for robust training and robust accuracy.

Batches reach the model normalized, ``(x − mean) / std``; an ε of 8/255 must mean 8 grey levels, so
the attacks work in pixel space: un-normalize, perturb within the ε-ball *and* the valid image
range [0, 1], normalize again — the normalization sits between the attack and the model, as if it
were the model's first layer. Gradients are taken with ``torch.autograd.grad`` with respect to the
perturbation only: no parameter's ``.grad`` is touched, and the constrainer's gradient hooks (which
fire on parameter gradients) never run, so an attack inside a training step leaves the step alone.

Attacks run the model in eval mode (BatchNorm's running statistics are neither used from the
batch nor updated by the attack's extra forwards) and restore the previous mode. In data-parallel
runs each rank attacks its own shard of the batch: nothing here communicates.

- FGSM (Goodfellow et al. 2015): one step of size ε from the clean image.
- PGD-k (Madry et al. 2018): uniform random start in the ε-ball (unless ``random_start: false``),
  k steps of size α, each projected back onto the ε-ball ∩ [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from elastictrain.config import ConfigError, fail
from elastictrain.progress import Progress, bar


@dataclass(slots=True)
class AttackConfig:
    kind: Literal["fgsm", "pgd"] = "pgd"
    eps: float = 8 / 255
    """L∞ radius in pixel units ([0, 1] images)."""
    alpha: float = 2 / 255
    """PGD step size (FGSM steps by ``eps``)."""
    steps: int = 7
    """PGD iterations (the seed trains and reports PGD-7; use 20 or 50 for a stronger report)."""
    random_start: bool = True
    """PGD: start from a uniform point of the ε-ball."""

    def __post_init__(self) -> None:
        if self.kind not in ("fgsm", "pgd"):
            fail("kind", f"must be fgsm or pgd (got {self.kind!r})")
        if not 0 <= self.eps <= 1:
            fail("eps", f"must be in [0, 1] (pixel units; 8/255 ≈ 0.0314) (got {self.eps})")
        if not self.alpha > 0:
            fail("alpha", f"must be > 0 (got {self.alpha})")
        if self.steps < 1:
            fail("steps", f"must be >= 1 (got {self.steps})")

    @property
    def name(self) -> str:
        return "fgsm" if self.kind == "fgsm" else f"pgd-{self.steps}"


@dataclass(slots=True)
class AdversarialConfig:
    """Adversarial training in a stage: loss = (1 − beta) · CE(clean) + beta · CE(adversarial)."""

    beta: float = 0.5
    """weight of the adversarial loss (the seed's ``adversarial_beta``); 1 = adversarial examples only."""
    attack: AttackConfig = field(default_factory=AttackConfig)
    eval_images: int = 1000
    """test images the stage's report attacks at its end (robust accuracy with ``attack``); 0 = none."""

    def __post_init__(self) -> None:
        if not 0 < self.beta <= 1:
            fail("beta", f"must be in (0, 1] (got {self.beta})")
        if self.eval_images < 0:
            fail("eval_images", f"must be >= 0 (got {self.eval_images})")


def parse_attacks(text: str, eps: float = 8 / 255, where: str = "--attacks") -> list[AttackConfig]:
    """``"fgsm,pgd"``, ``"pgd-20"``, ``"pgd-50"`` … → attack configs of radius ``eps`` (PGD: α = eps / 4)."""
    out = []
    try:
        for item in (t.strip() for t in text.split(",") if t.strip()):
            kind, _, k = item.partition("-")
            if kind == "fgsm" and not k:
                out.append(AttackConfig(kind="fgsm", eps=eps))
            elif kind == "pgd" and (not k or k.isdigit()):
                out.append(AttackConfig(kind="pgd", steps=int(k) if k else 7, eps=eps, alpha=eps / 4 if eps else 1e-3))
            else:
                raise ConfigError(f"unknown attack {item!r} (expected fgsm, pgd or pgd-K)")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return out


def _stats(mean: Sequence[float], std: Sequence[float], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, len(mean), 1, 1)
    return (torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape),
            torch.tensor(std, dtype=x.dtype, device=x.device).view(shape))


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig, mean: Sequence[float],
           std: Sequence[float], autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Adversarial versions of the normalized batch ``x`` (same shape, normalized), in eval mode."""
    mean_C11, std_C11 = _stats(mean, std, x)
    x_pix = (x.detach() * std_C11 + mean_C11).clamp_(0, 1)
    if cfg.kind == "fgsm":
        steps, alpha, delta = 1, cfg.eps, torch.zeros_like(x_pix)
    else:
        steps, alpha = cfg.steps, cfg.alpha
        delta = (torch.rand_like(x_pix) * 2 - 1) * cfg.eps if cfg.random_start else torch.zeros_like(x_pix)
    delta = ((x_pix + delta).clamp_(0, 1) - x_pix)
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            delta.requires_grad_(True)
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=autocast_dtype,
                                                     enabled=autocast_dtype is not None):
                loss = nn.functional.cross_entropy(model((x_pix + delta - mean_C11) / std_C11).float(), y)
            (g,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():  # ascend, then project onto the ε-ball ∩ [0, 1]
                delta = (delta + alpha * g.sign()).clamp_(-cfg.eps, cfg.eps)
                delta = (x_pix + delta).clamp_(0, 1) - x_pix
    finally:
        model.train(was_training)
    return ((x_pix + delta.detach() - mean_C11) / std_C11).to(x.dtype)


def robust_accuracy(model: nn.Module, loader, cfg: AttackConfig, mean: Sequence[float], std: Sequence[float],
                    limit: Optional[int] = None, autocast_dtype: Optional[torch.dtype] = None,
                    progress: Optional[Progress] = None) -> dict:
    """Accuracy on adversarial versions of (at most ``limit``) images of ``loader``: {accuracy, images}."""
    n = correct = 0
    pbar = bar(progress, limit, f"attack {cfg.name}", "img")
    for x, y in loader:
        if limit is not None and n >= limit:
            break
        if limit is not None:
            x, y = x[:limit - n], y[:limit - n]
        x_adv = attack(model, x, y, cfg, mean, std, autocast_dtype)
        model.eval()
        with torch.no_grad(), torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            correct += int((model(x_adv).argmax(1) == y).sum())
        n += y.numel()
        pbar.update(y.numel(), acc=correct / n)
    pbar.close()
    return {"accuracy": correct / max(n, 1), "images": n}
