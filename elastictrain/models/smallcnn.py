"""SmallCNN: the CPU quickstart's model — cheap to run, rich in prunable weights.

Two strided conv+BN+ReLU layers take a 28×28 (or 32×32) image to 64 maps of 7×7 (8×8) for about
1 M multiply-adds, then a 256-unit hidden layer and the classifier. Most of the ~0.8 M weights sit
in ``classifier.0`` — the layer that pruning thins most — so 50× compression with 2-bit codes is
reachable in a few CPU epochs (a CIFAR VGG16 costs ~300× more per image).
"""
from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(  # conv weights: features.0, features.3
            nn.Conv2d(in_channels, 32, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(7), nn.Flatten(),
        )
        self.classifier = nn.Sequential(  # linear weights: classifier.0, classifier.3
            nn.Linear(64 * 7 * 7, 256), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(256, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def smallcnn(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    return SmallCNN(num_classes, in_channels)
