"""The settings of one split's loader, as one typed object (``loader.BatchLoader`` and
``folder.FolderLoader`` both take it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, kw_only=True)
class Batches:
    """How one split is served: the loaders below take this instead of a dozen arguments."""

    batch_size: int
    """examples per batch on this rank."""
    train: bool
    """shuffle each epoch, take an equal shard per rank, augment if ``augment``, drop a last partial
    batch unless ``drop_last=False``; otherwise fixed order, no augmentation, every example once."""
    mean: tuple[float, ...]
    """per channel, in [0, 1] units (``DataBundle.mean``)."""
    std: tuple[float, ...]
    augment: bool = False
    hflip: bool = False
    pad_to: Optional[int] = None
    """in-memory data only: centre the images on a canvas this wide (e.g. 28×28 → 32×32)."""
    crop_padding: Optional[int] = None
    """in-memory data only: random-crop offsets up to this (None: ``default_crop_padding``)."""
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    micro_batches: int = 1
    """training: batches per optimizer step on this rank (gradient accumulation); a step's examples
    are interleaved over world_size × micro_batches shards (``shard``), the same on any world size."""
    drop_last: Optional[bool] = None
    workers: int = 2
    """image folders only: DataLoader worker processes."""
