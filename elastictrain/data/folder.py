"""Image folders (ImageNet-style JPEG trees): a torch DataLoader with the standard transforms.

Such data sets do not fit on the device, so decoding and augmentation run in ``workers``
processes per rank with torchvision's usual recipe (train: RandomResizedCrop 224 + mirror; eval:
Resize 256 + CenterCrop 224; then normalize). The iteration interface is the one of
``loader.BatchLoader``: ``set_epoch``, ``len`` and ``(x, y)`` batches already on ``device``.

Sharding uses ``shard.shard_indices`` rather than torch's DistributedSampler, so both loaders
shard alike; the difference matters for evaluation, where DistributedSampler would repeat
examples to even out the shards and so count some test images twice.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from elastictrain.data.batches import Batches
from elastictrain.data.shard import mix_seed, shard_indices, step_positions


class ShardSampler(Sampler[int]):
    """This rank's examples for the current epoch, by the rule of ``shard.shard_indices``."""

    def __init__(self, n: int, seed: int, rank: int, world_size: int, train: bool, batch: int = 1,
                 micro_batches: int = 1) -> None:
        self.n, self.seed, self.rank, self.world_size, self.train = n, seed, rank, world_size, train
        self.steps = {"batch": batch, "micro_batches": micro_batches} if train else {}
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        return iter(shard_indices(self.n, seed=self.seed, epoch=self.epoch, rank=self.rank,
                                  world_size=self.world_size, train=self.train, **self.steps).tolist())

    def __len__(self) -> int:
        if self.train:
            return len(step_positions(self.n, rank=self.rank, world_size=self.world_size, **self.steps))
        return len(range(self.rank, self.n, self.world_size))


class _Transformed(Dataset):
    """The bundle's ImageFolder with a loader's own transform (the bundle's dataset is shared)."""

    def __init__(self, folder: ImageFolder, transform: Callable) -> None:
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        path, target = self.folder.samples[i]
        return self.transform(self.folder.loader(path)), target


def folder_transform(train: bool, augment: bool, hflip: bool, mean: Sequence[float], std: Sequence[float]):
    """torchvision's ImageNet recipe; a training split without ``augment`` gets the eval view."""
    if train and augment:
        steps = [T.RandomResizedCrop(224)] + ([T.RandomHorizontalFlip()] if hflip else [])
    else:
        steps = [T.Resize(256), T.CenterCrop(224)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(list(mean), list(std))])


class FolderLoader:
    """Batches of an ImageFolder split on ``device``; see the module docstring."""

    def __init__(self, folder: ImageFolder, b: Batches, device: torch.device | str) -> None:
        batch_size, train, seed, rank, world_size = b.batch_size, b.train, b.seed, b.rank, b.world_size
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1 (got {batch_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank} is not in 0..{world_size - 1}")
        self.device = torch.device(device)
        self.seed, self.rank = seed, rank
        self.sampler = ShardSampler(len(folder), seed, rank, world_size, train, batch_size, b.micro_batches)
        # seeds the workers' augmentation, re-seeded per epoch in __iter__; workers are not
        # persistent so that each epoch's seed reaches them (with workers=0 the crops draw from
        # torch's global generator instead)
        self._gen = torch.Generator()
        self._loader = DataLoader(
            _Transformed(folder, folder_transform(train, b.augment, b.hflip, b.mean, b.std)), batch_size=batch_size,
            sampler=self.sampler, num_workers=b.workers, drop_last=train if b.drop_last is None else b.drop_last,
            pin_memory=self.device.type == "cuda", generator=self._gen)
        if train and len(self) == 0:
            raise ValueError(f"batch_size: {batch_size} is more than the {len(folder) // world_size} training "
                             f"examples of rank {rank}, so an epoch would have no step")

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation (identical on every rank) and augmentation of ``epoch``."""
        self.sampler.epoch = epoch

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # with workers > 0 each worker's torch seed derives from this generator: reproducible crops
        self._gen.manual_seed(mix_seed(self.seed, self.sampler.epoch, self.rank, 2))
        for x, y in self._loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
