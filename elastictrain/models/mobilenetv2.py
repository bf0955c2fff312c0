"""MobileNetV2 (Sandler et al. 2018), CIFAR variant.

As in the common CIFAR port, the stem conv has stride 1 and so does the second stage (stride 2 on
ImageNet): 32×32 inputs are then downsampled 8× to 4×4 rather than 32× to 1×1. The blocks are the
paper's (residual only where stride is 1 and the width is unchanged), so the parameter count is
exactly torchvision's ``mobilenet_v2`` at the same ``num_classes``; the port's extra 1×1 shortcut
convs are left out. Adaptive average pooling before ``classifier`` makes any input ≥ 8×8 work.
"""
from __future__ import annotations

from torch import Tensor, nn

# One row per stage: (expansion t, output channels c, blocks n, stride of the first block s).
CIFAR_STAGES = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]


def conv_bn_relu6(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1×1 expand (skipped when t = 1), 3×3 depthwise, 1×1 linear projection (no activation)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        layers = [] if expansion == 1 else [conv_bn_relu6(c_in, hidden)]
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers = [conv_bn_relu6(in_channels, 32, 3, stride=1)]
        c = 32
        for t, c_out, n, s in CIFAR_STAGES:
            for j in range(n):
                layers.append(InvertedResidual(c, c_out, s if j == 0 else 1, t))
                c = c_out
        layers.append(conv_bn_relu6(c, 1280))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)
        # torchvision's init for mobilenet_v2.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def mobilenetv2(num_classes: int = 10, in_channels: int = 3) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels)
