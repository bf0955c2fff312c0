"""Does an input of this shape fit the model? One dry forward, and a one-line answer naming the
layer where it stops — before any training, export or evaluation starts."""
from __future__ import annotations

import torch
from torch import nn

from elastictrain.config import ConfigError


def dry_forward(model: nn.Module, example: torch.Tensor, where: str) -> torch.Tensor:
    """``model(example)`` in eval mode without gradients (the model's mode is restored). A
    ConfigError names ``where``, the input's C×H×W and the innermost layer that failed:
    ``where: input 1×28×28 does not fit the model (at features.33, MaxPool2d: Given input size …)``."""
    entered: list[tuple[str, nn.Module]] = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: entered.append((n, m)))
             for n, m in model.named_modules() if n]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(example)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        at = f"at {entered[-1][0]}, {type(entered[-1][1]).__name__}: " if entered else ""
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{where}: input {'×'.join(map(str, example.shape[1:]))} does not fit the model "
                          f"({at}{first})") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
