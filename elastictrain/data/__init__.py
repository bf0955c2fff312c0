"""Training data: from local files to device-resident, augmented, sharded batches.

``datasets`` (what to load: :class:`DataConfig`, :func:`load` → :class:`DataBundle`) reads IDX
files (``idx``) and CIFAR pickles (``cifar``, with a restricted unpickler) into :class:`InMemory`
splits; ``shard`` says which examples each rank visits; ``augment`` crops and mirrors whole
batches on the device; ``loader`` batches in-memory splits and ``folder`` image folders.
"""
from elastictrain.data.batches import Batches
from elastictrain.data.datasets import DataBundle, DataConfig, InMemory, load
from elastictrain.data.loader import BatchLoader, make_loader, make_loaders

__all__ = ["BatchLoader", "Batches", "DataBundle", "DataConfig", "InMemory", "load", "make_loader", "make_loaders"]
