"""Model zoo: every builder takes ``num_classes`` and ``in_channels``.

Registered names (``list_models()``) are the CIFAR-style models the seed trains; ``torchvision:NAME``
builds any torchvision classifier, untrained. ``constrainable`` names the tensors the constraint
layer works on.

Input sizes: VGG's five max-pools need 32×32 (a 28×28 image is pooled to nothing — pad
Fashion-MNIST to 32 for it); every other registered model pools adaptively and takes 28×28 too.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from elastictrain.models.convnet import convnet
from elastictrain.models.lenet import lenet5
from elastictrain.models.mobilenetv2 import mobilenetv2
from elastictrain.models.resnet import RESNET_DEPTHS, resnet
from elastictrain.models.resnet_cifar import RESNET_CIFAR_BLOCKS, resnet_cifar
from elastictrain.models.smallcnn import smallcnn
from elastictrain.models.torchvision_zoo import torchvision_model
from elastictrain.models.vgg import VGG_CONFIGS, vgg
from elastictrain.models.vggcpu import vggcpu

TORCHVISION_PREFIX = "torchvision:"

MODELS: dict[str, Callable[..., nn.Module]] = {
    "smallcnn": smallcnn,
    **{name: partial(vgg, name) for name in VGG_CONFIGS},
    **{name: partial(resnet_cifar, name) for name in RESNET_CIFAR_BLOCKS},
    **{name: partial(resnet, name) for name in RESNET_DEPTHS},
    "mobilenetv2": mobilenetv2,
    "lenet5": lenet5,
    "convnet": convnet,
    "vggcpu": vggcpu,
}


def list_models() -> list[str]:
    """Registered names, sorted (``torchvision:NAME`` is accepted on top of these)."""
    return sorted(MODELS)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    for field, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"model.{field}: must be a positive integer, got {value!r}")
    if name.startswith(TORCHVISION_PREFIX):
        return torchvision_model(name[len(TORCHVISION_PREFIX):], num_classes, in_channels)
    if name not in MODELS:
        raise ValueError(f"model: unknown model {name!r} (expected one of {', '.join(list_models())}, "
                         f"or {TORCHVISION_PREFIX}NAME)")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)


def constrainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Qualified name -> weight of every Conv2d (4-D) and Linear (2-D) module, in module order.

    These are the tensors compression specs refer to; biases, BatchNorm and embeddings are left
    dense. Names match ``model.named_parameters()``.
    """
    return {f"{name}.weight" if name else "weight": m.weight
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
