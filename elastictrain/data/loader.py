"""Batches ready for the model: on the device, augmented, normalized, sharded across ranks.

For in-memory splits, :class:`BatchLoader` moves the whole uint8 split to the device once (47 MB
for Fashion-MNIST) and builds each batch there with one gather (crop + mirror + ``pad_to``, see
``augment``) and one normalization, so a step costs a few small kernels and no host work, no
worker processes and no host-to-device copy of pixels. Image folders go through ``folder`` (a
torch DataLoader). Both yield ``(x float32 B×C×S×S, y int64 B)`` on ``device`` and follow the
sharding rule of ``shard``; call ``set_epoch(e)`` before each epoch, as with a DistributedSampler.

Random numbers (the permutation, crop offsets, mirror bits) come from CPU generators seeded by
(seed, epoch) and are drawn once per epoch for the whole permutation (each rank takes its
positions), so a run is reproducible on any device, the same on CPU and GPU, and an example is
augmented alike on any world size.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Iterator, Optional

import torch

from elastictrain.data.augment import normalize, pad_center, random_crop_flip
from elastictrain.data.batches import Batches
from elastictrain.data.datasets import DataBundle, DataConfig, InMemory, Split
from elastictrain.data.shard import mix_seed, shard_indices, step_positions


def default_crop_padding(side: int) -> int:
    """4 pixels for 32×32 inputs (the usual CIFAR crop), 2 for smaller ones such as 28×28."""
    return 4 if side >= 32 else 2


class BatchLoader:
    """Iterate an :class:`InMemory` split in device-resident, augmented, normalized batches (see
    :class:`Batches` for what each setting does)."""

    def __init__(self, split: InMemory, b: Batches, device: torch.device | str) -> None:
        _, c, h, w = split.images.shape
        batch_size, train, augment, hflip, mean, std = b.batch_size, b.train, b.augment, b.hflip, b.mean, b.std
        pad_to, crop_padding, seed, rank, world_size = b.pad_to, b.crop_padding, b.seed, b.rank, b.world_size
        drop_last = b.drop_last
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1 (got {batch_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank} is not in 0..{world_size - 1}")
        if pad_to is not None and pad_to < max(h, w):
            raise ValueError(f"pad_to: {pad_to} is smaller than the {h}×{w} images")
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std: {len(mean)}/{len(std)} values for {c}-channel images")
        if crop_padding is not None and crop_padding < 0:
            raise ValueError(f"crop_padding: must be >= 0 (got {crop_padding})")
        if augment and not train:
            warnings.warn("BatchLoader: augment=True is ignored for an evaluation split (train=False)", stacklevel=2)
        self.device = torch.device(device)
        # once per loader; contiguous so gathers can index the flat storage
        self.images = split.images.to(self.device).contiguous()
        self.labels = split.labels.to(self.device)
        self.batch_size, self.train, self.pad_to = batch_size, train, pad_to
        self.augment = augment and train
        self.hflip = hflip and self.augment
        self.padding = default_crop_padding(pad_to or max(h, w)) if crop_padding is None else crop_padding
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(c, 1, 1)
        self.seed, self.rank, self.world_size, self.micro_batches = seed, rank, world_size, b.micro_batches
        self.drop_last = train if drop_last is None else drop_last
        self.epoch = 0
        mix_seed(seed)  # rejects a negative seed now rather than at the first epoch
        if train and len(self) == 0:  # an evaluation shard may be empty (fewer examples than ranks)
            times = f" × {b.micro_batches} micro-batches a step" if b.micro_batches > 1 else ""
            raise ValueError(f"batch_size: {batch_size}{times} is more than the {len(self.labels) // world_size} "
                             f"training examples of rank {rank}, so an epoch would have no step")

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (identical on every rank) and this rank's crops and flips."""
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """The examples this rank visits this epoch, in order (CPU int64), before batching."""
        return shard_indices(len(self.labels), seed=self.seed, epoch=self.epoch, rank=self.rank,
                             world_size=self.world_size, train=self.train, **self._steps())

    def _steps(self) -> dict:
        """Training visits whole optimizer steps (``shard.step_positions``); evaluation every example."""
        return {"batch": self.batch_size, "micro_batches": self.micro_batches} if self.train else {}

    def _shard_len(self) -> int:
        n, ws = len(self.labels), self.world_size
        if self.train:
            return len(step_positions(n, rank=self.rank, world_size=ws, **self._steps()))
        return len(range(self.rank, n, ws))

    def __len__(self) -> int:
        m, b = self._shard_len(), self.batch_size
        return m // b if self.drop_last else -(-m // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        nb, b = len(self), self.batch_size
        idx = self.indices()[: nb * b]
        params = self._draw() if self.augment else None
        idx = idx.to(self.device)
        for i in range(nb):
            sl = slice(i * b, (i + 1) * b)
            if params is not None:
                dy, dx, flip = params
                x = random_crop_flip(self.images, idx[sl], dy[sl], dx[sl], None if flip is None else flip[sl],
                                     self.padding, self.pad_to)
            else:
                x = pad_center(self.images.index_select(0, idx[sl]), self.pad_to)
            yield normalize(x, self.mean, self.std), self.labels.index_select(0, idx[sl])

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Crop offsets in [0, 2·padding] and mirror bits for the examples this rank visits this
        epoch. Drawn for every position of the epoch's shared permutation and taken at this rank's
        positions, so an example gets the same crop on any world size — what lets a stage change
        its world size mid-way (``elastictrain.train.step_split``)."""
        n = len(self.labels)
        at = step_positions(n, rank=self.rank, world_size=self.world_size, **self._steps())
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 1))
        dy_dx = torch.randint(0, 2 * self.padding + 1, (2, n), generator=g)[:, at]
        flip = torch.randint(0, 2, (n,), generator=g)[at].bool() if self.hflip else None
        return dy_dx[0].to(self.device), dy_dx[1].to(self.device), None if flip is None else flip.to(self.device)


def make_loader(split: Split, b: Batches, device: torch.device | str):
    """A :class:`BatchLoader` for in-memory splits, a ``folder.FolderLoader`` for image folders."""
    if isinstance(split, InMemory):
        return BatchLoader(split, b, device)
    if b.pad_to is not None or b.crop_padding is not None:
        raise ValueError("pad_to/crop_padding: only for in-memory data sets (not image folders)")
    from elastictrain.data.folder import FolderLoader  # keeps torchvision out of in-memory runs

    return FolderLoader(split, b, device)


def _batches(bundle: DataBundle, cfg: DataConfig, split: Split, train: bool, seed: int, rank: int,
             world_size: int) -> Batches:
    in_memory = isinstance(split, InMemory)
    return Batches(batch_size=cfg.batch_size if train else cfg.eval_batch_size, train=train,
                   augment=cfg.augment and train, hflip=bundle.hflip, mean=tuple(bundle.mean), std=tuple(bundle.std),
                   pad_to=cfg.pad_to if in_memory else None, crop_padding=cfg.crop_padding if in_memory else None,
                   seed=seed, rank=rank, world_size=world_size, workers=cfg.workers)


def make_loaders(bundle: DataBundle, cfg: DataConfig, device: torch.device | str, seed: int = 0, rank: int = 0,
                 world_size: int = 1, micro_batches: int = 1):
    """(train_loader, test_loader) for ``bundle`` as ``cfg`` says; its batch sizes are per rank here
    (a pipeline stage divides the global batch by the world size before calling this), and a
    training step is ``micro_batches`` batches (gradient accumulation)."""
    b = dataclasses.replace(_batches(bundle, cfg, bundle.train, True, seed, rank, world_size),
                            micro_batches=micro_batches)
    train = make_loader(bundle.train, b, device)
    return train, make_test_loader(bundle, cfg, device, rank, world_size, seed)


def make_test_loader(bundle: DataBundle, cfg: DataConfig, device: torch.device | str, rank: int = 0,
                     world_size: int = 1, seed: int = 0):
    """The test split alone, as ``make_loaders`` builds it (evaluation needs no training batches)."""
    return make_loader(bundle.test, _batches(bundle, cfg, bundle.test, False, seed, rank, world_size), device)
