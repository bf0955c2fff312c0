"""``torchvision:NAME``: any torchvision classification model, built untrained.

``weights=None`` always — the library never downloads anything. For ``in_channels != 3`` the first
``nn.Conv2d`` (in registration order, which is the input conv for every torchvision classifier) is
replaced by one with the same hyperparameters and ``in_channels`` inputs; it gets PyTorch's default
init, as nothing pretrained is lost by the swap.
"""
from __future__ import annotations

from torch import nn


def classification_models() -> list[str]:
    """Names ``torchvision:NAME`` accepts: classifiers only (no detection/segmentation/video heads)."""
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the first Conv2d for one reading ``in_channels`` channels, in place."""
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    if conv is None:
        raise ValueError(f"model.in_channels: {type(model).__name__} has no Conv2d to adapt to {in_channels} channels")
    if conv.groups != 1:
        raise ValueError(f"model.in_channels: first conv {name!r} of {type(model).__name__} is grouped "
                         f"(groups={conv.groups}); cannot change its input channels")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
    return model


def torchvision_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    import torchvision.models

    if name not in classification_models():
        raise ValueError(f"model: unknown torchvision model {name!r} "
                         f"(expected a classifier from torchvision.models.list_models(module=torchvision.models))")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return model if in_channels == 3 else replace_first_conv(model, in_channels)
