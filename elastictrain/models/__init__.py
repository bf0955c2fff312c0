"""Model zoo (grows with the pipeline); every builder takes ``num_classes`` and ``in_channels``."""
from __future__ import annotations

from torch import nn

from .vgg import VGG_CONFIGS, vgg

MODELS = {name: (lambda n: lambda **kw: vgg(n, **kw))(name) for name in VGG_CONFIGS}


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"model: unknown model {name!r} (expected one of {', '.join(sorted(MODELS))})")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)
