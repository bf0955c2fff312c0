"""elastictrain.data on small files written here in the real on-disk formats (nothing downloaded)."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from elastictrain.config import ConfigError, build
from elastictrain.data import Batches, BatchLoader, DataConfig, InMemory, load, make_loaders
from elastictrain.data.augment import random_crop_flip
from elastictrain.data.cifar import safe_load
from elastictrain.data.idx import read_idx
from elastictrain.data.shard import shard_indices

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ---- writers for the real formats ---------------------------------------------------------------

_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(a: np.ndarray) -> bytes:
    """An IDX file as MNIST's are written: magic, dtype code, dims, big-endian values."""
    head = bytes([0, 0, _IDX_CODES[a.dtype.type], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, a: np.ndarray) -> Path:
    data = idx_bytes(a)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_mnist_like(root: Path, n_train: int = 60, n_test: int = 20, size: int = 28, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10  # every class present
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, size, size), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


class Py2Pickler(pickle._Pickler):
    """Writes byte and text strings as Python 2's cPickle did (BINSTRING), like the CIFAR files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_str8(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("ascii")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_str8
    dispatch[str] = save_str8


def py2_pickle(obj) -> bytes:
    import io

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # the official files name numpy < 2's module path
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def write_cifar10(root: Path, per_batch: int = 8, seed: int = 0) -> np.ndarray:
    """cifar-10-batches-py/ with five training batches and a test batch; returns all train data."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        labels[0] = 9  # the real files hold every class; the test checks the label range
        batch = {b"batch_label": b"training batch", b"labels": labels, b"data": data,
                 b"filenames": [b"img_%d.png" % i for i in range(per_batch)]}
        (folder / name).write_bytes(py2_pickle(batch))
        if name != "test_batch":
            train.append((data, labels))
    return np.concatenate([d for d, _ in train])


def write_cifar100(root: Path, n: int = 12, seed: int = 1) -> None:
    """cifar-100-python/ written by Python 3's own pickle (protocol 2: bytes via _codecs.encode)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        fine = [99] + [int(v) for v in rng.integers(0, 100, n - 1)]
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": fine,
                 b"coarse_labels": [f // 5 for f in fine], b"filenames": [b""] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def write_image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def toy_split(n: int = 50, c: int = 1, size: int = 28, seed: int = 0) -> InMemory:
    """Random images whose label is their index, so a batch's ``y`` says which examples it holds."""
    g = torch.Generator().manual_seed(seed)
    return InMemory(torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g), torch.arange(n))


def loader(split: InMemory, **kw) -> BatchLoader:
    c = split.images.shape[1]
    args = dict(batch_size=8, train=True, augment=True, hflip=True, mean=(0.5,) * c, std=(0.25,) * c)
    args.update(kw)
    device = args.pop("device", "cpu")
    return BatchLoader(split, Batches(**args), device)


def normalized(images: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (images.float() / 255 - m) / s


# ---- IDX ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_idx_roundtrip_plain_and_gz(tmp_path, dtype):
    a = (np.arange(24).reshape(2, 3, 4) * 1000 - 5000).astype(dtype) if dtype != np.uint8 else \
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        t = read_idx(write_idx(tmp_path / name, a))
        assert t.shape == (2, 3, 4) and t.numpy().dtype == np.dtype(dtype)
        np.testing.assert_array_equal(t.numpy(), a)  # big-endian values decoded, not byte-swapped


@pytest.mark.parametrize("damage", ["truncated", "trailing", "magic", "dtype", "gzip"])
def test_bad_idx_names_the_file(tmp_path, damage):
    data = idx_bytes(np.zeros((5, 4, 4), np.uint8))
    data = {"truncated": data[:-3], "trailing": data + b"\0", "magic": b"\x08" + data[1:],
            "dtype": data[:2] + b"\x42" + data[3:], "gzip": data}[damage]
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.compress(data)
    path.write_bytes(raw[: len(raw) // 2] if damage == "gzip" else raw)
    with pytest.raises(ValueError, match=str(path)) as e:
        read_idx(path)
    assert "\n" not in str(e.value)


# ---- loading data sets --------------------------------------------------------------------------

def test_load_mnist_style(tmp_path):
    root = write_mnist_like(tmp_path / "fm", n_train=60, n_test=20)
    b = load(DataConfig(name="fashion-mnist", root=str(root)))
    assert b.train.images.shape == (60, 1, 28, 28) and b.train.images.dtype == torch.uint8
    assert b.test.images.shape == (20, 1, 28, 28) and b.test.labels.dtype == torch.int64
    assert (b.num_classes, b.in_channels, b.image_size, b.hflip) == (10, 1, 28, True)
    pixels = b.train.images.double() / 255
    assert b.mean[0] == pytest.approx(pixels.mean().item(), abs=1e-12)
    assert b.std[0] == pytest.approx(pixels.std(unbiased=False).item(), abs=1e-12)
    assert load(DataConfig(name="mnist", root=str(root))).hflip is False  # mirrored digits change meaning


def test_limits_and_pad_to(tmp_path):
    root = write_mnist_like(tmp_path / "fm")
    full = load(DataConfig(name="fashion-mnist", root=str(root)))
    b = load(DataConfig(name="fashion-mnist", root=str(root), limit_train=16, limit_test=5, pad_to=32))
    assert (len(b.train), len(b.test), b.image_size) == (16, 5, 32)
    assert torch.equal(b.train.images, full.train.images[:16]) and b.mean == full.mean
    with pytest.raises(ValueError, match=r"^data.pad_to: 24 is smaller than the 28-pixel images"):
        load(DataConfig(name="fashion-mnist", root=str(root), pad_to=24))


def test_missing_root_and_files(tmp_path):
    with pytest.raises(ValueError, match=r"^data.root: .*nope is not a directory \(install with: apt-get install "
                                         r"dataset-fashion-mnist\)$"):
        load(DataConfig(name="fashion-mnist", root=str(tmp_path / "nope")))
    root = write_mnist_like(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match=r"^data.root: .* has no t10k-labels-idx1-ubyte.gz .*dataset-fashion-mnist"):
        load(DataConfig(name="fashion-mnist", root=str(root)))
    (root / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(20, np.uint8)))  # plain files work too
    assert len(load(DataConfig(name="fashion-mnist", root=str(root))).test) == 20
    with pytest.raises(ValueError, match=r"^data.root: .* has no cifar-10-batches-py/data_batch_1"):
        load(DataConfig(name="cifar10", root=str(root)))


def test_label_checks(tmp_path):
    root = write_mnist_like(tmp_path / "fm", n_train=30)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: 29 labels for the 30 images"):
        load(DataConfig(name="mnist", root=str(root)))
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(30, dtype=np.uint8) % 5)  # 5 classes in train
    with pytest.raises(ValueError, match=r"^data.root: test labels span 0..9, expected 0..4$"):
        load(DataConfig(name="mnist", root=str(root)))


def test_config_validation():
    cfg = build(DataConfig, {"name": "cifar10", "root": "/x", "pad_to": 40})
    assert (cfg.batch_size, cfg.eval_batch_size, cfg.augment, cfg.workers) == (128, 512, True, 2)
    assert build(DataConfig, {"name": "fashion-mnist"}).root == "/usr/share/datasets/fashion-mnist"
    for bad, msg in [({"name": "cifar10"}, "root: required for cifar10"),
                     ({"name": "mnist", "root": "/x", "batch_size": 0}, "batch_size: must be >= 1"),
                     ({"name": "mnist", "root": "/x", "limit_test": 0}, "limit_test: must be >= 1"),
                     ({"name": "imagefolder", "root": "/x", "pad_to": 32}, "pad_to: only for in-memory"),
                     ({"name": "svhn", "root": "/x"}, "name: must be one of"),
                     ({"name": "mnist", "root": "/x", "shuffle": True}, "shuffle: unknown key")]:
        with pytest.raises(ConfigError, match=f"^{msg}"):
            build(DataConfig, bad)


def test_cifar10_python_folder(tmp_path):
    train = write_cifar10(tmp_path)
    b = load(DataConfig(name="cifar10", root=str(tmp_path)))
    assert b.train.images.shape == (40, 3, 32, 32) and b.train.images.dtype == torch.uint8
    assert b.test.images.shape == (8, 3, 32, 32) and b.train.labels.dtype == torch.int64
    assert (b.num_classes, b.in_channels, b.image_size, b.hflip) == (10, 3, 32, True)
    # row i is the R, G, B planes of image i, 32×32 each, row-major
    assert torch.equal(b.train.images[7, 1, 2, 5], torch.tensor(train[7, 1024 + 2 * 32 + 5]))
    assert len(b.mean) == 3 and all(0.45 < m < 0.55 for m in b.mean)


def test_cifar100_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    b = load(DataConfig(name="cifar100", root=str(tmp_path / "cifar-100-python")))  # the folder itself works too
    assert b.num_classes == 100 and b.train.labels[0] == 99 and b.train.images.shape == (12, 3, 32, 32)


def test_unpickler_refuses_code(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(ValueError, match=rf"^{path}: refusing to load (posix|os)\.system"):
        load(DataConfig(name="cifar10", root=str(tmp_path)))
    assert not marker.exists()
    with pytest.raises(ValueError, match=rf"^{path}: refusing"):
        safe_load(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the file is live: an ordinary unpickler does run it
    assert marker.exists()


def test_truncated_pickle_names_file(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"^{path}: not a readable pickle"):
        load(DataConfig(name="cifar10", root=str(tmp_path)))


def test_image_folder(tmp_path):
    write_image_folder(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), batch_size=2, eval_batch_size=3, workers=0)
    b = load(cfg)
    assert (b.num_classes, b.in_channels, b.image_size, b.hflip) == (2, 3, 224, True)
    assert b.mean == (0.485, 0.456, 0.406)
    train, test = make_loaders(b, cfg, "cpu")
    assert (len(train), len(test)) == (3, 2)
    x, y = next(iter(train))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    ys = torch.cat([y for _, y in test])
    assert ys.tolist() == [0, 0, 1, 1]  # eval: every example once, in order
    shards = [make_loaders(b, cfg, "cpu", rank=r, world_size=2)[0].sampler for r in (0, 1)]
    a, c = (set(iter(s)) for s in shards)
    assert len(a) == len(c) == 2 and not a & c  # whole steps: one of 2 × 2 of the 6 training images


# ---- loader: sharding ---------------------------------------------------------------------------

def test_shards_disjoint_equal_and_reproducible():
    n = 101
    for epoch in (0, 1):
        parts = [shard_indices(n, seed=3, epoch=epoch, rank=r, world_size=2, train=True) for r in (0, 1)]
        assert len(parts[0]) == len(parts[1]) == 50
        assert not set(parts[0].tolist()) & set(parts[1].tolist())
        assert torch.equal(parts[0], shard_indices(n, seed=3, epoch=epoch, rank=0, world_size=2, train=True))
    assert not torch.equal(shard_indices(n, seed=3, epoch=0, rank=0, world_size=2, train=True),
                           shard_indices(n, seed=3, epoch=1, rank=0, world_size=2, train=True))
    evals = [shard_indices(n, seed=3, epoch=0, rank=r, world_size=2, train=False) for r in (0, 1)]
    assert sorted(torch.cat(evals).tolist()) == list(range(n))


def test_loader_shards_cover_the_epoch():
    split = toy_split(n=101)
    ranks = [loader(split, rank=r, world_size=2, batch_size=10, seed=5) for r in (0, 1)]
    for epoch in (0, 1):
        seen = []
        for ld in ranks:
            ld.set_epoch(epoch)
            ys = [y for _, y in ld]
            assert len(ys) == len(ld) == 5 and all(len(y) == 10 for y in ys)
            seen.append(torch.cat(ys))
        assert not set(seen[0].tolist()) & set(seen[1].tolist())
        assert len(set(seen[0].tolist()) | set(seen[1].tolist())) == 100  # all but world_size-1 at most
    again = loader(split, rank=1, world_size=2, batch_size=10, seed=5)
    again.set_epoch(1)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(again, ranks[1]))
    ev = [loader(split, train=False, augment=False, rank=r, world_size=2, batch_size=10) for r in (0, 1)]
    assert (len(ev[0]), len(ev[1])) == (6, 5)
    assert sorted(torch.cat([y for ld in ev for _, y in ld]).tolist()) == list(range(101))


def test_train_batch_larger_than_shard():
    with pytest.raises(ValueError, match="batch_size: 64 is more than the 25 training examples of rank 0"):
        loader(toy_split(n=50), batch_size=64, world_size=2)


# ---- loader: augmentation -----------------------------------------------------------------------

def test_no_augment_gives_normalized_images_exactly():
    split = toy_split(n=30)
    mean, std = [0.3], [0.4]
    x, y = next(iter(loader(split, train=False, augment=False, mean=mean, std=std)))
    assert torch.equal(y, torch.arange(8))
    assert torch.equal(x, normalized(split.images[:8], mean, std))
    x, y = next(iter(loader(split, train=True, augment=False, mean=mean, std=std)))
    assert not torch.equal(y, torch.arange(8))  # shuffled
    assert torch.equal(x, normalized(split.images[y], mean, std))


def test_augment_keeps_shape_and_changes_pixels():
    split = toy_split(n=40, c=3, size=32)
    ld = loader(split, mean=[0.5] * 3, std=[0.25] * 3)
    batches = list(ld)
    assert len(batches) == 5 and all(x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 for x, _ in batches)
    x, y = batches[0]
    assert not torch.equal(x, normalized(split.images[y], [0.5] * 3, [0.25] * 3))


def reference_crop_flip(images, idx, dy, dx, flip, padding, pad_to):
    """Per-sample Python loop: centre on the canvas, zero-pad, slice, mirror."""
    out = []
    for b in range(len(idx)):
        img = images[idx[b]]
        h, w = img.shape[-2:]
        if pad_to is not None:
            top, left = (pad_to - h) // 2, (pad_to - w) // 2
            img = F.pad(img, (left, pad_to - w - left, top, pad_to - h - top))
        s, t = img.shape[-2:]
        img = F.pad(img, (padding,) * 4)[:, dy[b]:dy[b] + s, dx[b]:dx[b] + t]
        out.append(img.flip(-1) if flip is not None and flip[b] else img)
    return torch.stack(out)


@pytest.mark.parametrize("c,size,padding,pad_to", [(1, 28, 2, None), (3, 32, 4, None), (1, 28, 4, 32),
                                                   (1, 28, 3, 31), (2, 5, 6, None)])
def test_random_crop_matches_loop_reference(c, size, padding, pad_to):
    g = torch.Generator().manual_seed(c * 100 + size + padding)
    images = torch.randint(1, 256, (20, c, size, size), dtype=torch.uint8, generator=g)  # no zeros: padding shows
    idx = torch.randint(0, 20, (12,), generator=g)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, 12), generator=g)
    flip = torch.randint(0, 2, (12,), generator=g).bool()
    for f in (flip, None):
        got = random_crop_flip(images, idx, dy, dx, f, padding, pad_to)
        assert torch.equal(got, reference_crop_flip(images, idx, dy, dx, f, padding, pad_to))


def test_loader_flips_and_crops_from_the_right_image():
    split = toy_split(n=24)
    mean, std = [0.5], [0.25]
    x, y = next(iter(loader(split, crop_padding=0, hflip=True, batch_size=24, mean=mean, std=std)))
    plain = normalized(split.images[y], mean, std)
    same = (x == plain).flatten(1).all(1)
    mirrored = (x == plain.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    # with padding and no flips every output is one of the (2p+1)² crops of its own image
    x, y = next(iter(loader(split, crop_padding=2, hflip=False, batch_size=6, mean=mean, std=std)))
    for b in range(6):
        padded = F.pad(normalized(split.images[y[b]], mean, std), (2,) * 4, value=-2.0)  # -2 is a zero pixel
        crops = [padded[:, i:i + 28, j:j + 28] for i in range(5) for j in range(5)]
        assert any(torch.equal(x[b], crop) for crop in crops)


def test_pad_to_32():
    split = toy_split(n=16)
    mean, std = [0.5], [0.25]
    x, y = next(iter(loader(split, train=False, augment=False, pad_to=32, mean=mean, std=std)))
    assert x.shape == (8, 1, 32, 32)
    assert torch.equal(x[:, :, 2:30, 2:30], normalized(split.images[:8], mean, std))
    border = x.clone()
    border[:, :, 2:30, 2:30] = -2.0
    assert (border == -2.0).all()  # padding is black (0 → (0 - 0.5) / 0.25)
    xa, _ = next(iter(loader(split, pad_to=32)))
    assert xa.shape == (8, 1, 32, 32)


def test_make_loaders_from_config(tmp_path):
    root = write_mnist_like(tmp_path / "fm", n_train=60, n_test=20)
    cfg = DataConfig(name="fashion-mnist", root=str(root), batch_size=16, eval_batch_size=7, pad_to=32)
    b = load(cfg)
    train, test = make_loaders(b, cfg, "cpu", seed=1)
    assert (len(train), len(test)) == (3, 3) and train.padding == 4 and train.hflip
    assert next(iter(train))[0].shape == (16, 1, 32, 32)
    assert sum(len(y) for _, y in test) == 20


# ---- the real files, when installed -------------------------------------------------------------

def test_real_fashion_mnist():
    if not (REAL_FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{REAL_FMNIST} missing (install with: apt-get install dataset-fashion-mnist)")
    b = load(DataConfig(name="fashion-mnist"))
    assert (len(b.train), len(b.test), b.num_classes, b.in_channels) == (60000, 10000, 10, 1)
    assert torch.bincount(b.train.labels).tolist() == [6000] * 10
    assert b.mean[0] == pytest.approx(0.2860, abs=1e-4) and b.std[0] == pytest.approx(0.3530, abs=1e-4)
