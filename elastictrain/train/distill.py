"""Knowledge distillation (Hinton et al. 2015): a compressing stage learns from an earlier stage's
model as well as from the labels.

The student's loss becomes ``(1 − α) · task + α · T² · KL(softmax(t/T) ‖ softmax(s/T))``, where
``task`` is the stage's own loss (cross-entropy, or the clean/adversarial mix), ``s`` and ``t``
the student's and the teacher's logits on the *same* inputs (an adversarial stage distils on its
adversarial half too) and ``T²`` keeps the soft term's gradients on the scale of the hard one's.

The teacher is frozen: eval mode (BatchNorm uses its running statistics), no gradients, never
handed to an optimizer or a DeepSpeed engine — so every rank holds a whole replica, ZeRO-3
included, and nothing of it is partitioned, reduced or checkpointed (a stage records which
checkpoint taught it, by path and digest).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from elastictrain.config import fail


@dataclass(slots=True)
class DistillConfig:
    teacher: str
    """an earlier stage of the pipeline whose finished model teaches this stage."""
    alpha: float = 0.5
    """weight of the distillation term; 1 − alpha weighs the stage's own loss."""
    temperature: float = 4.0
    """softens both distributions; the term is scaled by temperature² (Hinton et al.)."""

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            fail("alpha", f"must be in [0, 1] (got {self.alpha})")
        if not self.temperature > 0:
            fail("temperature", f"must be > 0 (got {self.temperature})")


class Teacher:
    """A frozen model and how much its soft targets count."""

    def __init__(self, model: nn.Module, cfg: DistillConfig):
        self.model, self.alpha, self.temperature = model.eval(), cfg.alpha, cfg.temperature
        for p in model.parameters():
            p.requires_grad_(False)

    def mix(self, task_loss: torch.Tensor, x: torch.Tensor, student_logits: torch.Tensor,
            autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The student's loss: ``task_loss`` mixed with the soft-target term on inputs ``x``
        (``student_logits``: the student's fp32 logits for every row of ``x``)."""
        if self.alpha == 0:
            return task_loss
        with torch.no_grad(), torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            t_logits = self.model(x).float()
        return (1 - self.alpha) * task_loss + self.alpha * soft_loss(student_logits, t_logits, self.temperature)


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch."""
    T = temperature
    return F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                    reduction="batchmean", log_target=True) * (T * T)
