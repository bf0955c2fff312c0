"""VGG-CPU: a conv-dominated VGG-style network that trains on Fashion-MNIST on a laptop CPU.

The CPU tier's stand-in for the seed's CIFAR VGG16, where kernel, pattern and filter×channel-balanced
constraints matter: ~0.98 M weights, 99.7% of them in five 3×3 conv+BN+ReLU layers (32, 64, 128,
256, 256 channels), a global average pool and one linear ``classifier``. Resolution falls early —
three stride-2 convs take 28×28 to 4×4, a max-pool to 2×2 — so the wide layers, which hold the
weights, run on few positions: ~5.5 M multiply-adds an image (VGG16 on 32×32: ~313 M). Parameter
names follow VGG's (``features.N.weight``, ``classifier.weight``), so specs read the same.
"""
from __future__ import annotations

from torch import Tensor, nn

# (out channels, stride); "M" is a 2×2 max-pool
LAYERS = [(32, 2), (64, 2), (128, 2), "M", (256, 1), (256, 1)]


class VGGCPU(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out, stride = v
            # no conv bias: BatchNorm's shift makes it redundant
            layers += [nn.Conv2d(c, out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            c = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def vggcpu(num_classes: int = 10, in_channels: int = 1) -> VGGCPU:
    return VGGCPU(num_classes, in_channels)
