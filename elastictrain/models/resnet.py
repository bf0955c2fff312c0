"""ResNet18/34/50/101/152 with the CIFAR stem (He et al. 2016; the common CIFAR port).

The stem is one 3×3 stride-1 conv with no max-pool: on 32×32 (or 28×28) images the ImageNet stem
(7×7 stride 2 + max-pool) would throw away 15/16 of the pixels before the first block. Adaptive
average pooling before ``fc`` lets any input ≥ 8×8 through (28×28 Fashion-MNIST included).

The blocks and the ``ResNet`` body are shared with the 3-stage CIFAR ResNets in ``resnet_cifar``.
Names follow torchvision (``conv1``, ``layerK.N.convM``, ``layerK.N.downsample.0``, ``fc``) so a
spec written against one reads on the other.
"""
from __future__ import annotations

from torch import Tensor, nn


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv here is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def projection(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    """Option-B shortcut (1×1 conv + BN) where the block changes shape, identity elsewhere."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3×3 convs; the stride (if any) is on the first."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(c_in, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(c_in, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3, 1×1 expand (×4); the stride is on the 3×3 (torchvision's "v1.5")."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(c_in, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(c_in, c_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """Stem (3×3 conv to ``widths[0]``), one stage per entry of ``depths`` (the first at stride 1,
    each later one halving the resolution), global average pool, ``fc``."""

    def __init__(self, block: type[BasicBlock | Bottleneck], depths: list[int], widths: list[int],
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        assert len(depths) == len(widths)
        self.conv1, self.bn1 = conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c = widths[0]
        for i, (depth, planes) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                blocks.append(block(c, planes, stride=2 if i > 0 and j == 0 else 1))
                c = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(depths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        # torchvision's init: He-normal (fan-out) convs, BN as identity; Linear keeps its default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


# name -> (block, blocks per stage); widths 64/128/256/512 as on ImageNet.
RESNET_DEPTHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def resnet(name: str, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    block, depths = RESNET_DEPTHS[name]
    return ResNet(block, depths, [64, 128, 256, 512], num_classes, in_channels)
