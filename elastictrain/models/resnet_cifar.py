"""ResNet20/32/56, the 3-stage CIFAR ResNets of He et al. 2016 (§4.2): a 16-channel 3×3 stem,
then 3 stages of n basic blocks at 16/32/64 channels (depth 6n+2), global pool, ``fc``.

The paper uses option-A shortcuts (zero-padded identity); we use option B (1×1 conv + BN where
the shape changes), which the paper reports as marginally better and which keeps every tensor a
plain weight the constraint layer can see. That adds 2,752 parameters: ResNet20 has 272,474
rather than the 269,722 usually quoted.
"""
from __future__ import annotations

from elastictrain.models.resnet import BasicBlock, ResNet

# name -> n, the number of basic blocks per stage (depth = 6n + 2).
RESNET_CIFAR_BLOCKS = {"resnet20": 3, "resnet32": 5, "resnet56": 9}


def resnet_cifar(name: str, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    n = RESNET_CIFAR_BLOCKS[name]
    return ResNet(BasicBlock, [n, n, n], [16, 32, 64], num_classes, in_channels)
