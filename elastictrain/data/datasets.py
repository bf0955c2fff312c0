"""Which data set a run trains on, and loading it from local files (nothing is ever downloaded).

```yaml
data:
  name: fashion-mnist       # fashion-mnist | mnist | cifar10 | cifar100 | imagefolder
  root: /usr/share/datasets/fashion-mnist   # the default for fashion-mnist only
  batch_size: 128           # the global batch: each of W ranks takes 128 / W
  pad_to: 32                # 28×28 -> 32×32 so VGG's five poolings fit
```
Small data sets (IDX and CIFAR) are loaded whole as uint8 tensors (:class:`InMemory`): 47 MB for
Fashion-MNIST, 150 MB for CIFAR, so the loader can keep them on the GPU and augment there. An
``imagefolder`` root (ImageNet-style ``train/`` and ``val/`` or ``test/``) stays on disk and goes
through a torchvision ``ImageFolder``. Files that are missing or malformed are one-line
``ValueError``s naming the file.

Horizontal flips: on for CIFAR, image folders and Fashion-MNIST (no class of clothing is defined by
its left-right orientation; Zhong et al.'s Random Erasing recipe flips Fashion-MNIST too), off for
MNIST digits, whose mirror images are not digits of the same class.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Union

import torch

from elastictrain.config import fail
from elastictrain.data import cifar
from elastictrain.data.idx import read_idx

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

Name = Literal["fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder"]

DEFAULT_ROOTS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
_HINTS = {"fashion-mnist": " (install with: apt-get install dataset-fashion-mnist)"}
# split -> (images, labels) file names, each found as NAME.gz or plain NAME
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_HFLIP = {"fashion-mnist": True, "mnist": False, "cifar10": True, "cifar100": True, "imagefolder": True}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(slots=True)
class DataConfig:
    """The data set, where it lives, and how it is batched."""

    name: Name
    """fashion-mnist | mnist | cifar10 | cifar100 | imagefolder."""
    root: Optional[str] = None
    """folder holding the files; defaults to the Debian package's folder for fashion-mnist only."""
    batch_size: int = 128
    """training examples per step over all ranks (the global batch; each of W ranks takes 1/W)."""
    eval_batch_size: int = 512
    """test examples per batch over all ranks."""
    augment: bool = True
    """random crops (and flips where they keep the label) on the training split."""
    pad_to: Optional[int] = None
    """zero-pad the images to this side, e.g. 32 for 28×28 digits fed to VGG (in-memory data only)."""
    crop_padding: Optional[int] = None
    """zero padding of the random crop; default 4 for images of 32 pixels or more, else 2."""
    limit_train: Optional[int] = None
    """use only the first N training examples (tests, quick runs)."""
    limit_test: Optional[int] = None
    """use only the first N test examples."""
    workers: int = 2
    """decoding processes per rank; only image folders use them (the rest is already in memory)."""

    def __post_init__(self) -> None:
        if self.name not in typing.get_args(Name):
            fail("name", f"must be one of {', '.join(typing.get_args(Name))} (got {self.name!r})")
        if self.root is None:
            if self.name not in DEFAULT_ROOTS:
                fail("root", f"required for {self.name}")
            self.root = DEFAULT_ROOTS[self.name]
        for field in ("batch_size", "eval_batch_size"):
            if getattr(self, field) < 1:
                fail(field, f"must be >= 1 (got {getattr(self, field)})")
        for field in ("pad_to", "limit_train", "limit_test"):
            value = getattr(self, field)
            if value is not None and value < 1:
                fail(field, f"must be >= 1 (got {value})")
            if value is not None and self.name == "imagefolder":
                fail(field, "only for in-memory data sets (not imagefolder)")
        if self.crop_padding is not None and self.crop_padding < 0:
            fail("crop_padding", f"must be >= 0 (got {self.crop_padding})")
        if self.workers < 0:
            fail("workers", f"must be >= 0 (got {self.workers})")


@dataclass(slots=True)
class InMemory:
    """A whole split as tensors: ``images`` uint8 N×C×H×W, ``labels`` int64 N."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"InMemory.images: expected uint8 N×C×H×W, "
                             f"got {self.images.dtype} {list(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"InMemory.labels: expected int64 of length {len(self.images)}, "
                             f"got {self.labels.dtype} {list(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: Optional[int]) -> InMemory:
        """The first ``n`` examples (a copy, so the rest of the file can be freed); all if None."""
        if n is None or n >= len(self):
            return self
        return InMemory(self.images[:n].clone(), self.labels[:n].clone())


Split = Union[InMemory, "ImageFolder"]


@dataclass(slots=True)
class DataBundle:
    """Both splits and what a model and a loader need to know about them."""

    train: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    """side of the square images the model sees (after ``pad_to``; 224 for image folders)."""
    mean: tuple[float, ...]
    """per-channel mean of the training images in [0, 1] units (ImageNet's for image folders)."""
    std: tuple[float, ...]
    """per-channel standard deviation, same units."""
    hflip: bool
    """whether a mirrored image keeps its label (see the module docstring)."""


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 N×C×H×W images, in [0, 1] units.

    A 256-bin histogram per channel gives both moments in float64 without a float copy of the
    data set (which would be 1.2 GB for CIFAR).
    """
    v = torch.arange(256, dtype=torch.float64)
    mean, std = [], []
    for c in range(images.shape[1]):  # a loop over channels, not samples
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        m = (counts * v).sum() / counts.sum()
        var = (counts * (v - m) ** 2).sum() / counts.sum()
        mean.append(float(m / 255))
        std.append(float(var.sqrt() / 255))
    return tuple(mean), tuple(std)


def _root(cfg: DataConfig) -> Path:
    root = Path(cfg.root)  # type: ignore[arg-type]  # set by __post_init__
    try:
        found = root.is_dir()
    except (OSError, ValueError):  # a name the OS refuses (too long, …)
        found = False
    if not found:
        raise ValueError(f"data.root: {root} is not a directory{_HINTS.get(cfg.name, '')}")
    return root


def _find_idx(root: Path, stem: str, name: str) -> Path:
    for path in (root / f"{stem}.gz", root / stem):
        if path.is_file():
            return path
    raise ValueError(f"data.root: {root} has no {stem}.gz (nor {stem}){_HINTS.get(name, '')}")


def _load_idx_split(root: Path, split: str, name: str) -> InMemory:
    img_path, lbl_path = (_find_idx(root, stem, name) for stem in _IDX_FILES[split])
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(f"{img_path}: expected uint8 N×H×W images, found {images.dtype} {list(images.shape)}")
    if labels.dim() != 1 or labels.dtype.is_floating_point:
        raise ValueError(f"{lbl_path}: expected integer labels N, found {labels.dtype} {list(labels.shape)}")
    if len(labels) != len(images):
        raise ValueError(f"{lbl_path}: {len(labels)} labels for the {len(images)} images of {img_path.name}")
    return InMemory(images.unsqueeze(1).contiguous(), labels.long())


def _load_cifar_split(root: Path, split: str, name: str) -> InMemory:
    layout = cifar.LAYOUTS[name]
    folder = root / layout.folder if (root / layout.folder).is_dir() else root  # accept the folder itself
    files = getattr(layout, split)
    for f in files:
        if not (folder / f).is_file():
            raise ValueError(f"data.root: {root} has no {layout.folder}/{f} (unpack the python-version archive there)")
    return InMemory(*cifar.read_batches([folder / f for f in files], layout.label_key))


def _check_labels(split: InMemory, num_classes: int, where: str) -> None:
    if len(split) == 0:
        raise ValueError(f"data.root: the {where} split has no examples")
    lo, hi = int(split.labels.min()), int(split.labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"data.root: {where} labels span {lo}..{hi}, expected 0..{num_classes - 1}")


def _load_folder(cfg: DataConfig) -> DataBundle:
    from torchvision.datasets import ImageFolder  # only image folders need torchvision

    root = _root(cfg)
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise ValueError(f"data.root: {root} needs train/ and val/ (or test/) folders of one subfolder per class")
    try:
        train, test = ImageFolder(str(root / "train")), ImageFolder(str(test_dir))
    except FileNotFoundError as e:  # no class folders, or a class with no image
        raise ValueError(f"data.root: {e}") from None
    if train.classes != test.classes:
        raise ValueError(f"data.root: {test_dir} has classes {test.classes[:5]}..., not those of {root / 'train'}")
    return DataBundle(train, test, len(train.classes), 3, 224, IMAGENET_MEAN, IMAGENET_STD, _HFLIP[cfg.name])


def load(cfg: DataConfig) -> DataBundle:
    """Read both splits of ``cfg.name`` from ``cfg.root`` and describe them."""
    if cfg.name == "imagefolder":
        return _load_folder(cfg)
    root = _root(cfg)
    read = _load_cifar_split if cfg.name in cifar.LAYOUTS else _load_idx_split
    train, test = read(root, "train", cfg.name), read(root, "test", cfg.name)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise ValueError(f"data.root: train images are {list(train.images.shape[1:])}, "
                         f"test images {list(test.images.shape[1:])}")
    _, channels, h, w = train.images.shape
    if h != w:
        raise ValueError(f"data.root: images are {h}×{w}, expected square images")
    if cfg.pad_to is not None and cfg.pad_to < h:
        raise ValueError(f"data.pad_to: {cfg.pad_to} is smaller than the {h}-pixel images of {cfg.name}")
    # the class count comes from the labels for IDX files, from the format for CIFAR
    num_classes = cifar.LAYOUTS[cfg.name].num_classes if cfg.name in cifar.LAYOUTS else int(train.labels.max()) + 1
    _check_labels(train, num_classes, "training")
    _check_labels(test, num_classes, "test")
    mean, std = channel_stats(train.images)  # of the whole training file, whatever limit_train says
    return DataBundle(train.head(cfg.limit_train), test.head(cfg.limit_test), num_classes, channels,
                      cfg.pad_to or h, mean, std, _HFLIP[cfg.name])
