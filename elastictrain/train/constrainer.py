"""The constrainer: keeps a model's constrained weights on their spec while it trains.

Per training step (the loop calls these in order):
  ``before_forward``  QAT: the latent fp32 weights are stashed and their quantized values
                      (current masks + codebooks) written in, so forward/backward see Q(W);
  ``after_backward``  the latent weights come back (straight-through estimator: the gradient at
                      Q(W) updates W); gradients of pruned weights are zeroed; ADMM adds ρ(W − Z + U);
  ``after_step``      weights are re-masked, so pruned weights are exactly 0 after every optimizer
                      step; on schedule, masks are recomputed (progressive), ADMM's Z, U updated,
                      or codebooks refit — and the updates made are returned ("masks",
                      "codebooks", "admm"), so the caller runs what must follow one (under
                      DeepSpeed: re-mask the optimizer's partitions, check every rank agrees).
Methods: ``progressive`` (density follows a schedule to the target by ``end`` of the stage, masks
recomputed every ``update_every`` steps), ``admm`` (Zhang et al. 2018: Z = Π(W + U), U += W − Z,
ρ grows; a hard projection at ``end``, masked training after), ``fixed`` (project once at the
start, then hold masks). Every mask comes from ``projection.project`` — a deterministic function of
the weights — which is what lets the distributed layer check ranks with a checksum.
Weights are read and written through a layout (``layout.Whole``, or ``layout.Sharded`` under ZeRO-3,
set with ``use_layout``); masks are always whole-shaped.

*Followers* (coupled filter pruning: ``deploy.coupling``) are 1-D parameters — BatchNorm weights and
biases, conv biases — whose entry k is masked with the filters k of their weights: kept unless every
one of those weights has pruned all of filter k. Their masks are a function of the weight masks, so
they are never stored and every rank derives the same ones; they are applied wherever weight masks
are (parameters after every step, gradients, optimizer moments). Whole weights only (ZeRO 0–2).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import nn

from elastictrain.config import fail
from elastictrain.constraints.plan import LayerPlan
from elastictrain.constraints.projection import LayerState
from elastictrain.constraints.schedule import Schedule, plans_at
from elastictrain.train.layout import Whole


@dataclass(slots=True)
class ADMMConfig:
    rho: float = 1e-3
    """initial penalty ρ."""
    growth: float = 1.3
    """ρ is multiplied by this at every Z, U update …"""
    rho_max: float = 1.0
    """… up to this."""

    def __post_init__(self) -> None:
        if self.rho <= 0 or self.rho_max < self.rho:
            fail("rho", f"need 0 < rho <= rho_max (got {self.rho}, {self.rho_max})")
        if self.growth < 1:
            fail("growth", f"must be >= 1 (got {self.growth})")


@dataclass(slots=True)
class EnforceConfig:
    method: Literal["progressive", "admm", "fixed"] = "progressive"
    """how the constraints are reached during the stage."""
    schedule: Schedule = "cubic"
    """progressive: density schedule (cubic = Zhu & Gupta)."""
    update_every: int = 50
    """steps between mask updates (progressive) or Z, U updates (ADMM)."""
    end: float = 0.75
    """fraction of the stage's steps after which masks are final (the rest trains with them held)."""
    codebook: Literal["refit", "fixed"] = "refit"
    """QAT: refit codebooks by k-means every ``refit_every`` steps, or keep the first fit."""
    refit_every: int = 50
    admm: ADMMConfig = field(default_factory=ADMMConfig)

    def __post_init__(self) -> None:
        if self.update_every < 1:
            fail("update_every", f"must be >= 1 (got {self.update_every})")
        if self.refit_every < 1:
            fail("refit_every", f"must be >= 1 (got {self.refit_every})")
        if not 0 < self.end <= 1:
            fail("end", f"must be in (0, 1] (got {self.end})")


def channel_mask(masks: list[torch.Tensor]) -> torch.Tensor:
    """(F,) bool: filter k of some mask (each (F, ...)) keeps an entry — a follower's mask."""
    return torch.stack([m.reshape(m.shape[0], -1).any(1) for m in masks]).any(0)


class Constrainer:
    def __init__(self, params: dict[str, nn.Parameter], plans: dict[str, LayerPlan], cfg: EnforceConfig,
                 total_steps: int, state: Optional[dict] = None,
                 followers: Optional[dict[str, Sequence[str]]] = None, micro_batches: int = 1):
        """``followers``: 1-D parameter name → the planned weights whose filters index it.
        ``micro_batches``: backward passes per optimizer step (gradient accumulation); the ADMM
        penalty's gradient is added to each, so each carries 1/``micro_batches`` of it."""
        self.micro_batches = micro_batches
        self.params = {n: params[n] for n in plans}
        self.followers = {n: tuple(ws) for n, ws in (followers or {}).items()}
        self.follower_params = {n: params[n] for n in self.followers}
        for n, ws in self.followers.items():
            bad = [w for w in ws if w not in plans or plans[w].shape[0] != params[n].numel()]
            if bad:
                raise ValueError(f"followers: {n} ({params[n].numel()} entries) follows {bad[0]}, which is not a "
                                 "planned weight with one filter per entry")
        self.plans, self.cfg = plans, cfg
        self.total_steps = max(total_steps, 1)
        self.end_step = max(1, int(round(cfg.end * self.total_steps)))
        self.masks = {n: torch.ones(plans[n].shape, dtype=torch.bool, device=p.device) for n, p in self.params.items()}
        self.layout = Whole(self.params)
        self.libraries: dict[str, torch.Tensor] = {}
        self.codebooks: dict[str, torch.Tensor] = {}
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self.rho = cfg.admm.rho
        self.step = 0
        self.final = False
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.stats = {"mask_updates": 0, "mask_changes": 0, "codebook_refits": 0, "admm_updates": 0}
        self._latent: dict[str, torch.Tensor] = {}
        self._kept: dict = {}  # per layer: codebook.KeptIndex or distributed.shards.ShardKept
        self._fmask: dict[str, torch.Tensor] = {}
        self._hooks: list = []
        if state:
            self.load_state_dict(state)
        # a stage never revives what an earlier stage pruned: every new mask is cut by these
        self.base_masks = {n: m.clone() for n, m in self.masks.items()}

    def resume(self, state: dict) -> None:
        """Continue a stage from its own saved ``state_dict()`` (after construction with the
        previous stage's state, before ``begin``): masks, base masks, codebooks, libraries, ADMM's
        Z, U and ρ, the step count and statistics, all as they were."""
        device = next(iter(self.params.values())).device if self.params else None
        moved = {k: ({n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in v.items()}
                     if isinstance(v, dict) and device is not None else v) for k, v in state.items()}
        self.load_state_dict(moved)

    def use_layout(self, layout) -> None:
        """Read and write weights through ``layout`` from now on (before ``begin``)."""
        if layout.sharded and self.cfg.method == "admm":
            raise ValueError("enforce.method: admm keeps whole-weight Z and U; it needs ZeRO 0–2, not sharded weights")
        if layout.sharded and self.followers:
            raise ValueError("prune.coupled: coupled filter pruning needs ZeRO 0–2 (it masks BatchNorm entries, "
                             "which ZeRO-3 partitions)")
        self.layout = layout
        self._kept.clear()
        self._fmask.clear()

    # -- the three per-step calls ---------------------------------------------------------------
    @torch.no_grad()
    def before_forward(self) -> None:
        if not self.codebooks:
            return
        self.layout.release()
        for n, book in self.codebooks.items():
            x, _ = self.layout.local(n)
            idx = self._kept_index(n)
            self._latent[n] = idx.take(x)  # only kept entries differ from Q(W)
            idx.quantize_(x, book)

    @torch.no_grad()
    def after_backward(self) -> None:
        self._restore_latent()

    def _grad_hook(self, n: str, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Runs as the gradient of ``p`` is produced — before any data-parallel reduction sees it."""
        with torch.no_grad():
            if self.Z:  # ADMM: d/dW of ρ/2‖W − Z + U‖² (W: the latent weights; no QAT during ADMM)
                g = g + self.rho / self.micro_batches * (p.detach() - self.Z[n] + self.U[n])
            return g * self._float_mask(n, g.dtype)

    @torch.no_grad()
    def after_step(self) -> list[str]:
        """Re-mask, then any update due at this step; returns the updates made, in order."""
        self.step += 1
        self._apply_masks()
        cfg, events = self.cfg, []
        if cfg.method == "progressive" and not self.final and self.step % cfg.update_every == 0:
            events.append(self.update_masks(min(self.step / self.end_step, 1.0)))
        elif cfg.method == "admm" and self.Z:
            if self.step >= self.end_step:
                self.Z, self.U = {}, {}
                events.append(self.update_masks(1.0))  # the hard projection; masked training from here on
            elif self.step % cfg.update_every == 0:
                events.append(self._admm_update())
        if self.final and self.codebooks and cfg.codebook == "refit" and self.step % cfg.refit_every == 0:
            events.append(self._refit())
        return events

    def _restore_latent(self) -> None:
        if self._latent:
            self.layout.release()
        for n, latent in self._latent.items():
            self._kept[n].put_(self.layout.local(n)[0], latent)
        self._latent.clear()

    @contextmanager
    def effective(self):
        """Within this block the model holds its effective (quantized) weights — for evaluation."""
        self.before_forward()
        try:
            yield
        finally:
            with torch.no_grad():
                self._restore_latent()

    # -- stage boundaries --------------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, optimizer: Optional[torch.optim.Optimizer] = None) -> list[str]:
        """Called once before the first step of a stage (after any state was loaded); returns the
        updates made, like ``after_step``."""
        self.optimizer = optimizer
        if not self._hooks:
            self._hooks = [p.register_hook(lambda g, n=n, p=p: self._grad_hook(n, p, g))
                           for n, p in self.params.items()]
            self._hooks += [p.register_hook(lambda g, n=n: g * self._float_mask(n, g.dtype))
                            for n, p in self.follower_params.items()]
        if self.step > 0:
            return []  # resumed mid-stage: the state already holds what we need
        if self.cfg.method == "admm":  # no hard mask until `end`; Z carries the constraints meanwhile
            self._admm_reset()
            return []
        return [self.update_masks(1.0 if self.cfg.method == "fixed" else 0.0)]

    @torch.no_grad()
    def finish(self) -> dict[str, LayerState]:
        """Bake the constraints into the weights (masks, final codebooks) and return their state."""
        self.layout.release()
        projected, states = self.layout.project(self.plans, self.libraries or None)
        held = self.codebooks
        self.masks = {n: s.mask for n, s in states.items()}
        self._kept.clear()
        self._fmask.clear()
        if self.cfg.codebook == "fixed":  # bake the held codebooks instead of a final refit
            for n, book in held.items():
                x, start = self.layout.local(n)
                q = x * self._float_mask(n, x.dtype).view(-1).narrow(0, start, x.numel())
                self._kept_index(n).quantize_(q, book)
                projected[n], states[n].codebook = q, book
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for n, q in projected.items():
            self.layout.local(n)[0].copy_(q)
        for n, p in self.follower_params.items():
            p.detach().mul_(self._float_mask(n, p.dtype))
        self.codebooks = {n: s.codebook for n, s in states.items() if s.codebook is not None}
        self.final = True
        return states

    # -- state updates -------------------------------------------------------------------------------
    @torch.no_grad()
    def update_masks(self, progress: float) -> str:
        plans = plans_at(self.plans, progress, self.cfg.schedule)
        _, states = self.layout.project(plans, self.libraries or None)
        changed = 0
        for n, s in states.items():
            mask = s.mask & self.base_masks[n]
            changed += int((mask != self.masks[n]).sum())
            self.masks[n] = mask
            if s.library is not None:
                self.libraries.setdefault(n, s.library)  # a library is chosen once per stage
            if s.codebook is not None and (n not in self.codebooks or self.cfg.codebook == "refit"):
                self.codebooks[n] = s.codebook
        self.stats["mask_updates"] += 1
        self.stats["mask_changes"] += changed
        self._kept.clear()
        self._fmask.clear()
        self.final = progress >= 1.0
        self._apply_masks(optimizer_state=True)
        return "masks"

    def _apply_masks(self, optimizer_state: bool = False) -> None:
        """Pruned weights to exactly 0 (every step: cheap, and robust to any optimizer). With
        ``optimizer_state`` (when masks change) momentum / Adam moments of pruned weights are
        dropped too; afterwards their gradients are 0, so those moments stay 0."""
        for n, p in self.params.items():
            x, start = self.layout.local(n)
            x.mul_(self._float_mask(n, x.dtype).view(-1).narrow(0, start, x.numel()))
            if optimizer_state and self.optimizer is not None:  # (DeepSpeed's: its backend, after the update)
                for v in self.optimizer.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        v.mul_(self.masks[n])
        for n, p in self.follower_params.items():  # whole parameters: followers need ZeRO 0–2
            keep = self._float_mask(n, p.dtype)
            p.detach().mul_(keep)
            if optimizer_state and self.optimizer is not None:
                for v in self.optimizer.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        v.mul_(keep.to(v.dtype))

    def masked(self):
        """(name, parameter, bool mask of its shape) for every masked parameter: the constrained
        weights, then the followers."""
        for n, p in self.params.items():
            yield n, p, self.masks[n]
        for n, p in self.follower_params.items():
            yield n, p, self._mask(n)

    def _mask(self, n: str) -> torch.Tensor:
        """A weight's mask, or a follower's, derived from its weights' masks."""
        ws = self.followers.get(n)
        return self.masks[n] if ws is None else channel_mask([self.masks[w] for w in ws])

    def _admm_reset(self) -> None:
        z, _ = self.layout.project(self.plans, self.libraries or None)
        self.Z = {n: z[n].view(p.shape) for n, p in self.params.items()}
        self.U = {n: torch.zeros_like(p) for n, p in self.params.items()}

    def _admm_update(self) -> str:
        w_plus_u = {n: p.detach() + self.U[n] for n, p in self.params.items()}
        z, states = self.layout.project(self.plans, self.libraries or None, values=w_plus_u)
        for n, s in states.items():
            if s.library is not None:
                self.libraries.setdefault(n, s.library)
        for n, p in self.params.items():
            self.Z[n] = z[n].view(p.shape).to(p.dtype)
            self.U[n].add_(p.detach() - self.Z[n])
        self.rho = min(self.rho * self.cfg.admm.growth, self.cfg.admm.rho_max)
        self.stats["admm_updates"] += 1
        return "admm"

    def admm_residual(self) -> float:
        """‖W − Z‖ / ‖W‖ over all constrained weights (ADMM's primal residual, relative)."""
        if not self.Z:
            return 0.0
        num = sum(float((p.detach() - self.Z[n]).pow(2).sum()) for n, p in self.params.items())
        den = sum(float(p.detach().pow(2).sum()) for p in self.params.values())
        return (num / max(den, 1e-30)) ** 0.5

    def _refit(self) -> str:
        for n in self.codebooks:
            q = self.plans[n].quantize
            self.codebooks[n] = self._kept_index(n).fit(self.layout.local(n)[0].float(), q.bits, q.method, q.iters)
        self.stats["codebook_refits"] += 1
        return "codebooks"

    def _float_mask(self, n: str, dtype: torch.dtype) -> torch.Tensor:
        """The whole mask in ``dtype``, cached: multiplying by a bool mask converts it every time."""
        m = self._fmask.get(n)
        if m is None or m.dtype != dtype:
            m = self._fmask[n] = self._mask(n).to(dtype)
        return m

    def _kept_index(self, n: str):
        """This rank's kept entries of ``n`` in codebook-group order; rebuilt only after the mask changes."""
        if n not in self._kept:
            self._kept[n] = self.layout.kept(self.masks[n], self.plans[n], n)
        return self._kept[n]

    # -- state for checkpoints and cross-rank checks ---------------------------------------------------
    def state_dict(self) -> dict:
        return {"masks": dict(self.masks), "libraries": dict(self.libraries), "codebooks": dict(self.codebooks),
                "Z": dict(self.Z), "U": dict(self.U), "rho": self.rho, "step": self.step, "final": self.final,
                "stats": dict(self.stats), "base_masks": dict(getattr(self, "base_masks", {}))}

    def load_state_dict(self, state: dict) -> None:
        for n in self.params:
            if n in state.get("masks", {}):
                self.masks[n] = state["masks"][n].to(torch.bool).reshape(self.plans[n].shape)
        self.libraries.update({n: v for n, v in state.get("libraries", {}).items() if n in self.params})
        self.codebooks.update({n: v for n, v in state.get("codebooks", {}).items()
                               if n in self.plans and self.plans[n].quantize})
        self.Z = dict(state.get("Z", {}))
        self.U = dict(state.get("U", {}))
        self.rho = state.get("rho", self.rho)
        self.step = state.get("step", 0)
        self.final = state.get("final", False)
        self.stats.update(state.get("stats", {}))
        if state.get("base_masks"):  # resuming mid-stage: the stage's own starting masks
            self.base_masks = {n: state["base_masks"][n].to(torch.bool).reshape(self.plans[n].shape)
                               for n in self.params if n in state["base_masks"]}
        self._kept.clear()
        self._fmask.clear()

    def checksum(self) -> str:
        """A fingerprint of masks, libraries and codebooks (equal on every rank, or a bug)."""
        h = hashlib.sha256()
        for group in (self.masks, self.libraries, self.codebooks):
            for n in sorted(group):
                h.update(n.encode())
                h.update(group[n].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]
