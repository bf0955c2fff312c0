"""LeNet-5 (LeCun et al. 1998) in its common modern form: ReLU and max-pooling, no RBF output.

``conv1`` pads by 2 so a 28×28 MNIST-style image reaches ``conv2`` as 14×14 and leaves it as the
paper's 16×5×5. A 32×32 image arrives at 16×6×6; the adaptive pool brings that to 5×5 too, so the
same weights (and ``fc1``'s 400 inputs) serve both sizes — at 28×28 the pool is the identity.
"""
from __future__ import annotations

from torch import Tensor, nn


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.fit = nn.AdaptiveAvgPool2d(5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.fit(self.pool(self.relu(self.conv2(x)))).flatten(1)  # (B, 400)
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


def lenet5(num_classes: int = 10, in_channels: int = 3) -> LeNet5:
    return LeNet5(num_classes, in_channels)
