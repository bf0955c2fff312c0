"""The epoch loop: optimizer and LR schedule from typed configs, one training epoch, evaluation.

One step is: ``before_forward`` → (adversarial inputs, if a hook is given: attacked at the
effective — quantized — weights the forward will use) → forward (+ a frozen teacher's forward on
the same inputs, when distilling) → backward → ``after_backward`` →
clip → optimizer step → LR step → ``after_step``. Under data parallelism the
gradient all-reduce happens inside backward (DDP / DeepSpeed), so every rank steps identical
weights and the constrainer's deterministic updates stay identical too.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from torch import nn

from elastictrain.config import fail
from elastictrain.progress import Progress, bar
from elastictrain.train.distill import Teacher


@dataclass(slots=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    """SGD momentum (AdamW uses its betas)."""
    weight_decay: float = 5e-4
    nesterov: bool = False
    clip_grad_norm: Optional[float] = None
    """clip the global gradient norm to this, if set."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            fail("lr", f"must be > 0 (got {self.lr})")
        if self.weight_decay < 0:
            fail("weight_decay", f"must be >= 0 (got {self.weight_decay})")
        if not 0 <= self.momentum < 1:
            fail("momentum", f"must be in [0, 1) (got {self.momentum})")


@dataclass(slots=True)
class LRConfig:
    name: Literal["cosine", "constant", "step"] = "cosine"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    """cosine: the LR ends at lr × this."""
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    """step: fractions of the stage where the LR is multiplied by ``gamma``."""
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.warmup_epochs < 0:
            fail("warmup_epochs", f"must be >= 0 (got {self.warmup_epochs})")
        if not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", f"must be in [0, 1] (got {self.min_lr_ratio})")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # no weight decay on biases and norm parameters (1-D), the usual practice
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(opt: torch.optim.Optimizer, cfg: LRConfig, steps_per_epoch: int, epochs: int):
    total = max(1, steps_per_epoch * epochs)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        if cfg.name == "cosine":
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if cfg.name == "step":
            return cfg.gamma ** sum(t >= m for m in cfg.milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class TorchStepper:
    """The optimizer step of a plain (single-process or DDP) model; DeepSpeed brings its own.
    A stepper also owns what resuming needs of the training state: ``save(dir)`` writes the
    model's (latent) weights, the optimizer's and the LR schedule's state, ``load(dir)`` reads
    them back (``weights_only``). With ``accumulation`` A, ``backward`` is called for each of A
    micro-batches (their mean gradient accumulates) and ``step`` once after the A-th."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, sched, clip: Optional[float] = None,
                 accumulation: int = 1):
        self.model, self.opt, self.sched, self.clip = model, opt, sched, clip
        self.accumulation, self.micro = accumulation, 0

    def save(self, directory, rank: int = 0) -> None:
        from elastictrain.checkpoint import atomic_save

        if rank == 0:
            atomic_save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                         "scheduler": self.sched.state_dict()}, Path(directory) / "engine.pt")

    def load(self, directory) -> None:
        from elastictrain.checkpoint import load

        state = load(Path(directory) / "engine.pt")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

    def backward(self, loss: torch.Tensor) -> None:
        if self.micro % self.accumulation == 0:  # the first micro-batch of a step
            self.opt.zero_grad(set_to_none=True)
        self.micro += 1
        (loss / self.accumulation if self.accumulation > 1 else loss).backward()

    def step(self) -> None:
        if self.clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]


@dataclass
class Hooks:
    """Optional callables the loop calls; the pipeline fills them (adversarial inputs, logging)."""

    adversarial: Optional[Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = None
    """adversarial versions of a batch (``attacks.attack``); the step then minimises
    (1 − adv_beta) · CE(clean) + adv_beta · CE(adversarial), both halves in one forward."""
    adv_beta: float = 0.5
    teacher: Optional[Teacher] = None
    """knowledge distillation: the loss is mixed with a frozen teacher's soft targets on the same
    inputs (``distill.Teacher``)."""
    on_update: Optional[Callable[[str], None]] = None
    """called with each constraint update the constrainer made after a step ("masks",
    "codebooks", "admm"): the stage re-masks the backend's optimizer state, checks ranks, logs."""
    before_micro_batch: Optional[Callable[[int, int], None]] = None
    """called before each micro-batch with (optimizer step of the epoch, micro-batch of the step):
    the stage seeds the micro-batch's randomness (dropout, attack starts) by its data shard."""
    on_step: Optional[Callable[[dict], None]] = None
    """called after every step with {loss, lr, step, images} (the pipeline's metric logging)."""
    progress: Optional[Progress] = None
    """a bar over the epoch's steps (images/s, running loss and accuracy); None: silent."""
    desc: str = "train"
    finite: Callable[[float], bool] = math.isfinite
    """the loss check after every step; distributed runs pass one that agrees across ranks."""


def train_epoch(model: nn.Module, loader, stepper, constrainer=None, hooks: Optional[Hooks] = None,
                autocast_dtype: Optional[torch.dtype] = None) -> dict:
    """One pass over ``loader``; returns the epoch's mean loss, accuracy, images/s and steps.

    ``model`` is what the forward pass calls (a DeepSpeed engine under DeepSpeed); ``stepper``
    owns backward and the optimizer step (``TorchStepper`` or the DeepSpeed one in ``jobs``).

    With ``stepper.accumulation`` A > 1 every A micro-batches make one optimizer step: the
    constrainer's step (re-mask, scheduled updates), the step hooks and ``steps`` count optimizer
    steps, and the last ``len(loader) % A`` micro-batches of an epoch are left out (as a loader's
    ``drop_last`` would), so that every step averages A micro-batches.
    """
    hooks = hooks or Hooks()
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    A = getattr(stepper, "accumulation", 1)
    usable = len(loader) - len(loader) % A
    t0, n_seen, loss_sum, correct, steps = time.perf_counter(), 0, 0.0, 0, 0
    step_loss, step_images = 0.0, 0
    pbar = bar(hooks.progress, usable // A, hooks.desc, "step")
    for i, (x, y) in enumerate(loader):
        if i >= usable:
            break
        if hooks.before_micro_batch is not None:
            hooks.before_micro_batch(i // A, i % A)
        if constrainer is not None:
            constrainer.before_forward()
        n = y.numel()
        if hooks.adversarial is not None:
            x_adv = hooks.adversarial(model, x, y)
            x = x_adv if hooks.adv_beta >= 1 else torch.cat([x, x_adv])
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x).float()
            if x.shape[0] == n:
                loss = loss_fn(out, y)
            else:  # [clean; adversarial]: the seed's adversarial_beta mix
                loss = (1 - hooks.adv_beta) * loss_fn(out[:n], y) + hooks.adv_beta * loss_fn(out[n:], y)
        if hooks.teacher is not None:  # on every row the student saw, adversarial ones included
            loss = hooks.teacher.mix(loss, x, out, autocast_dtype)
        out = out[:n]
        stepper.backward(loss)
        if constrainer is not None:
            constrainer.after_backward()
        loss_value = float(loss.detach())  # one device sync per micro-batch, shared by every consumer
        n_seen += y.numel()
        loss_sum += loss_value * y.numel()
        correct += int((out.detach().argmax(1) == y).sum())
        step_loss, step_images = step_loss + loss_value / A, step_images + y.numel()
        if (i + 1) % A:
            continue  # gradients accumulate until the A-th micro-batch
        stepper.step()
        if constrainer is not None:
            for event in constrainer.after_step():
                if hooks.on_update is not None:
                    hooks.on_update(event)
        steps += 1
        if hooks.on_step is not None:
            hooks.on_step({"loss": step_loss, "lr": stepper.lr, "step": steps, "images": step_images})
        step_loss, step_images = 0.0, 0
        pbar.update(1, loss=loss_sum / n_seen, acc=correct / n_seen,
                    **{"img/s": round(n_seen / max(time.perf_counter() - t0, 1e-9))})
        if not hooks.finite(loss_sum):
            raise FloatingPointError(f"the loss became NaN/Inf at step {steps} of the epoch")
    pbar.close()
    dt = time.perf_counter() - t0
    return {"loss": loss_sum / max(n_seen, 1), "train_acc": correct / max(n_seen, 1),
            "images_per_s": n_seen / max(dt, 1e-9), "steps": steps, "seconds": dt}


@torch.no_grad()
def evaluate(model: nn.Module, loader, autocast_dtype: Optional[torch.dtype] = None,
             progress: Optional[Progress] = None) -> dict:
    """Top-1 / top-5 accuracy and mean loss over ``loader`` (eval mode)."""
    model.eval()
    n, top1, top5, loss_sum = 0, 0, 0, 0.0
    pbar = bar(progress, len(loader), "eval", "batch")
    for x, y in loader:
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x)
        loss_sum += float(nn.functional.cross_entropy(out.float(), y, reduction="sum"))
        k = min(5, out.shape[1])
        pred = out.topk(k, dim=1).indices
        hit = pred == y[:, None]
        top1 += int(hit[:, 0].sum())
        top5 += int(hit.any(1).sum())
        n += y.numel()
        pbar.update(1, top1=top1 / n)
    pbar.close()
    return {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "test_loss": loss_sum / max(n, 1), "test_images": n}
