"""Training under constraints: the constrainer (masks, codebooks, ADMM state that shape the
weights during training) and the epoch loop. Nothing here assumes a single process: all state is
tensors, computed deterministically from the weights, so identical weights give identical state."""
from .constrainer import ADMMConfig, Constrainer, EnforceConfig
from .loop import Hooks, LRConfig, TorchStepper, OptimConfig, build_optimizer, build_scheduler, evaluate, train_epoch

__all__ = ["ADMMConfig", "Constrainer", "EnforceConfig", "Hooks", "LRConfig", "OptimConfig", "TorchStepper", "build_optimizer",
           "build_scheduler", "evaluate", "train_epoch"]
