"""Training under constraints: the constrainer (masks, codebooks, ADMM state that shape the
weights during training), the epoch loop, the backend a stage runs on (one process here; a
DeepSpeed rank in ``jobs``), knowledge distillation and adversarial attacks. Nothing here assumes a
single process: all state is tensors, computed deterministically from the weights, so identical
weights give identical state."""
from elastictrain.train.backend import Backend, Local, StageFailed, step_split
from elastictrain.train.constrainer import ADMMConfig, Constrainer, EnforceConfig
from elastictrain.train.distill import DistillConfig, Teacher
from elastictrain.train.loop import (
    Hooks,
    LRConfig,
    OptimConfig,
    TorchStepper,
    build_optimizer,
    build_scheduler,
    evaluate,
    train_epoch,
)

__all__ = ["ADMMConfig", "Backend", "Constrainer", "DistillConfig", "EnforceConfig", "Hooks", "LRConfig", "Local",
           "OptimConfig", "StageFailed", "Teacher", "TorchStepper", "build_optimizer", "build_scheduler", "evaluate",
           "step_split", "train_epoch"]
