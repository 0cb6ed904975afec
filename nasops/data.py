"""Data sets and loaders of the search driver.

Data sets (``load(name, split=...)``), all held in memory as one image tensor;
``split="train"`` (what a search uses) or ``"test"`` (held out for the final
training of a found cell, ``nasops.train``):

- ``digits`` (default): scikit-learn's 8x8 handwritten digits, 1797 grey images
  of 10 classes. It ships inside scikit-learn, so a fresh machine runs a search
  with no download. scikit-learn has no test split; ours is fixed and
  stratified: of each class's images, in scikit-learn's order, every fifth
  (the 5th, 10th, ...) is in the test split (355 images, 34 to 36 per class),
  the other 1442 in the training split. Pixels (0..16) are scaled to
  [0, 1] and normalised with the training split's mean and standard deviation
  (both splits alike).
- ``cifar10`` / ``cifar100``: the standard python-pickle batches of
  https://www.cs.toronto.edu/~kriz/cifar.html, extracted into ``data_dir``
  (``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` for CIFAR-10,
  ``train`` and ``test`` for CIFAR-100; the ``cifar-10-batches-py`` /
  ``cifar-100-python`` folder itself or its parent). The test split is
  ``test_batch`` / ``test``. Normalised with the usual
  per-channel CIFAR means and standard deviations. No augmentation: the search
  sees the plain images (DARTS's random crop and flip are a training-time
  regulariser we leave to the final training of the found cell).
- ``synthetic``: Gaussian noise images of any size with uniformly random labels,
  generated from the seed: for speed measurements only. Its test split is
  another draw, a fifth as large (at least 2 images).

A search uses the *training* split only (the test split is for the final
training of the found cell). As in DARTS, it is split at random (seeded) into a train part
for the network weights and a validation part for the architecture
(``train_portion`` of it goes to the weights; 0.5 by default).

Loaders are pure functions of (seed, epoch, rank): no hidden iterator state, so
a resumed run sees exactly the batches an uninterrupted run would have seen.
:func:`augment` is the training-time augmentation of ``nasops.train`` (random
crop, flip, cutout), drawn from a generator the caller seeds the same way;
:func:`eval_batches` walks a split once, every sample exactly once over the ranks.
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "cifar100", "synthetic")
SPLITS = ("train", "test")
# digits: the k-th image of a class (k = 1, 2, ... in scikit-learn's order) is in the
# test split when k is a multiple of DIGITS_TEST_EVERY.
DIGITS_TEST_EVERY = 5

_CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
_CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
_CIFAR_FILES = {"cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)],
                                                     "test": ["test_batch"]}),
                "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]})}


@dataclass
class ImageDataset:
    """Images and labels in memory. ``images`` is (N, C, H, W), either float32
    (already normalised) or uint8 (normalised per batch with ``mean``/``std``, so
    CIFAR takes 150 MB rather than 600 MB per process). ``mean``/``std``: the
    per-channel normalisation of pixels in [0, 1] (None: not normalised, the
    synthetic noise). ``black``, derived from them: the normalised value of a
    black (zero) pixel per channel (0 where not normalised), what a random crop
    pads with (as padding the raw image with zeros would)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    split: str = "train"

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    @property
    def black(self) -> tuple[float, ...]:
        if self.mean is None:
            return (0.0,) * self.in_channels
        return tuple(-m / s for m, s in zip(self.mean, self.std))

    def describe(self) -> dict:
        """What a network trained on this data set takes, for whoever feeds it
        later (``nasops.train.load_trained``): the images' channels, side and
        normalisation (``(pixel in [0, 1] - mean) / std`` per channel), and the classes."""
        return {"dataset": self.name, "in_channels": self.in_channels, "image_size": self.image_size,
                "num_classes": self.num_classes, "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std)}

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float32 normalised, labels int64) of the given sample indices."""
        x = self.images[index]
        if x.dtype == torch.uint8:
            mean = torch.tensor(self.mean).view(1, -1, 1, 1)
            std = torch.tensor(self.std).view(1, -1, 1, 1)
            x = (x.float() / 255.0 - mean) / std
        return x, self.labels[index]


def load(name: str, *, split: str = "train", data_dir: str | None = None, image_size: int = 32,
         num_classes: int = 10, synthetic_size: int = 512, seed: int = 0) -> ImageDataset:
    """The ``split`` ("train" or "test") of data set ``name`` (one of DATASETS).

    ``image_size``, ``num_classes`` and ``synthetic_size`` shape the synthetic
    set only (``synthetic_size`` is its training split's size); ``data_dir`` is
    where the CIFAR batches are.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}; got {split!r}")
    if name == "digits":
        return _digits(split)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, data_dir, split)
    if name == "synthetic":
        if split == "test":  # another draw: its own seed stream, a fifth as many images
            return _synthetic(image_size, num_classes, max(2, synthetic_size // 5), seed + 1_000_003, split)
        return _synthetic(image_size, num_classes, synthetic_size, seed, split)
    raise ValueError(f"dataset: expected one of {', '.join(DATASETS)}; got {name!r}")


def _digits(split: str) -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    is_test = digits_test_mask(y)
    train = x[~is_test]
    mean, std = train.mean(), train.std()
    keep = is_test if split == "test" else ~is_test
    x = (x[keep] - mean) / std
    return ImageDataset("digits", x.contiguous(), y[keep], num_classes=10, mean=(mean.item(),), std=(std.item(),),
                        split=split)


def digits_test_mask(labels: torch.Tensor) -> torch.Tensor:
    """True for the images of the digits test split (see the module doc)."""
    rank_in_class = torch.nn.functional.one_hot(labels).cumsum(0).gather(1, labels[:, None]).squeeze(1)
    return rank_in_class % DIGITS_TEST_EVERY == 0


def _cifar(name: str, data_dir: str | None, split: str) -> ImageDataset:
    folder, files = _CIFAR_FILES[name]
    files = files[split]
    if not data_dir:
        raise ValueError(f"dataset {name}: give --data-dir, the folder holding {folder}/ "
                         f"(the python version from https://www.cs.toronto.edu/~kriz/cifar.html)")
    root = os.path.join(data_dir, folder) if os.path.isdir(os.path.join(data_dir, folder)) else data_dir
    label_key = "labels" if name == "cifar10" else "fine_labels"
    images, labels = [], []
    for fname in files:
        path = os.path.join(root, fname)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset {name}: missing {path} (expected the python-pickle "
                                    f"batches {', '.join(files)} in {root})")
        with open(path, "rb") as f:
            try:
                entry = pickle.load(f, encoding="latin1")
            except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, IndexError) as exc:
                raise ValueError(f"dataset {name}: {path} is not a CIFAR batch (a truncated or other file: "
                                 f"{type(exc).__name__}: {exc})") from None
        # The batches are Python 2 pickles (str keys here); one written again from
        # Python 3 after loading it with encoding="bytes" has bytes keys.
        if isinstance(entry, dict):
            entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
            found = sorted(map(str, entry)) if isinstance(entry, dict) else f"a {type(entry).__name__}"
            raise ValueError(f"dataset {name}: {path} is not a CIFAR batch: expected a dict with the "
                             f"entries 'data' and {label_key!r}, got {found}")
        try:
            data = np.asarray(entry["data"], dtype=np.uint8)
            targets = np.asarray(entry[label_key], dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"dataset {name}: {path} is not a CIFAR batch ({type(exc).__name__}: {exc})") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or targets.shape != (data.shape[0],):
            raise ValueError(f"dataset {name}: {path} is not a CIFAR batch: expected 'data' of shape "
                             f"(N, 3072) and N {label_key!r}, got {data.shape} and {targets.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(targets)
    x = torch.from_numpy(np.concatenate(images))
    y = torch.from_numpy(np.concatenate(labels))
    return ImageDataset(name, x, y, num_classes=10 if name == "cifar10" else 100,
                        mean=_CIFAR_MEAN[name], std=_CIFAR_STD[name], split=split)


def _synthetic(image_size: int, num_classes: int, size: int, seed: int, split: str) -> ImageDataset:
    if image_size < 1 or num_classes < 2 or size < 2:
        raise ValueError(f"synthetic data: need image_size >= 1, num_classes >= 2, size >= 2; got "
                         f"image_size={image_size}, num_classes={num_classes}, size={size}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 3, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (size,), generator=g)
    return ImageDataset("synthetic", x, y, num_classes=num_classes, split=split)


def split(n: int, train_portion: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint random (train, val) sample indices, ``floor(train_portion * n)`` for train."""
    if not 0.0 < train_portion < 1.0:
        raise ValueError(f"train_portion: expected a fraction in (0, 1), got {train_portion}")
    n_train = int(math.floor(train_portion * n))
    if n_train < 1 or n_train >= n:
        raise ValueError(f"train_portion={train_portion} of {n} samples leaves an empty part")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train].sort().values, perm[n_train:].sort().values


class ShardedLoader:
    """Batches of ``dataset[indices]``, reshuffled each epoch, one shard per rank.

    The order of epoch e is a permutation drawn from seed ``(seed, e)`` only, so
    it needs no saved state. With ``world_size`` ranks, the permutation is
    padded by wrapping around to a multiple of ``world_size`` and rank r takes
    every world_size-th sample from r, as torch's DistributedSampler does; the
    ranks then hold equally many samples and run equally many steps.
    Incomplete last batches are dropped (BatchNorm in a search network does not
    like a batch of one, and every step then weighs the same).
    """

    def __init__(self, dataset: ImageDataset, indices: torch.Tensor, batch_size: int, *, seed: int,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.dataset, self.indices, self.batch_size = dataset, indices, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shard_size = math.ceil(len(indices) / world_size)
        if self.shard_size < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {self.shard_size} samples "
                             f"per rank of this split; use a smaller --batch-size")

    def __len__(self) -> int:
        return self.shard_size // self.batch_size

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, in visiting order."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = self.indices[torch.randperm(len(self.indices), generator=g)]
        total = self.shard_size * self.world_size
        if total > len(perm):
            perm = torch.cat([perm, perm[: total - len(perm)]])
        return perm[self.rank:total:self.world_size]

    def epoch(self, epoch: int):
        """Iterator over the (x, y) batches of ``epoch``."""
        order = self.order(epoch)
        for b in range(len(self)):
            yield self.dataset.batch(order[b * self.batch_size:(b + 1) * self.batch_size])


def eval_batches(dataset: ImageDataset, batch_size: int, *, rank: int = 0, world_size: int = 1):
    """(x, y) batches of rank ``rank``'s share of the whole of ``dataset``, in order.

    Rank r takes samples r, r + world_size, ...: over the ranks every sample is
    seen exactly once (no padding, the last batch may be short), so sums of
    per-sample results over the ranks are the exact totals.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    mine = torch.arange(rank, len(dataset), world_size)
    for start in range(0, len(mine), batch_size):
        yield dataset.batch(mine[start:start + batch_size])


def augment(x: torch.Tensor, *, generator: torch.Generator, crop_padding: int = 0, flip: bool = False,
            cutout: int = 0, fill: tuple[float, ...] | None = None) -> torch.Tensor:
    """The CIFAR training augmentation of DARTS' ``train.py`` on a normalised batch (B, C, H, W).

    In DARTS' order: a random crop of the image padded by ``crop_padding`` on
    every side (padded with ``fill`` per channel: the normalised black pixel,
    as torchvision's RandomCrop pads the raw image with zeros), a horizontal
    flip with probability 1/2 when ``flip``, then Cutout: a ``cutout`` x
    ``cutout`` square (clipped at the borders) around a uniformly random
    centre set to 0, after normalisation, as DARTS' Cutout. Draws from
    ``generator`` only (a CPU generator), so the caller decides what the
    randomness depends on.
    """
    if x.dim() != 4:
        raise ValueError(f"x: expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
    if crop_padding < 0 or cutout < 0:
        raise ValueError(f"crop_padding, cutout: expected >= 0, got {crop_padding}, {cutout}")
    B, C, H, W = x.shape
    if crop_padding:
        offsets = torch.randint(0, 2 * crop_padding + 1, (2, B), generator=generator)
        x = crop(x, crop_padding, offsets[0], offsets[1], fill)
    if flip:
        mirrored = torch.rand(B, generator=generator) < 0.5
        x = torch.where(mirrored.view(B, 1, 1, 1), x.flip(3), x)
    if cutout:
        cy = torch.randint(0, H, (B,), generator=generator)
        cx = torch.randint(0, W, (B,), generator=generator)
        rows, cols = torch.arange(H), torch.arange(W)
        inside_y = (rows >= cy[:, None] - cutout // 2) & (rows < cy[:, None] + cutout // 2)  # (B, H)
        inside_x = (cols >= cx[:, None] - cutout // 2) & (cols < cx[:, None] + cutout // 2)  # (B, W)
        x = x.masked_fill((inside_y[:, :, None] & inside_x[:, None, :]).unsqueeze(1), 0.0)
    return x


def crop(x: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor,
         fill: tuple[float, ...] | None = None) -> torch.Tensor:
    """Per sample b, the H x W window at (``top[b]``, ``left[b]``) of ``x[b]`` padded
    by ``padding`` on every side with ``fill`` (per channel; zeros if None)."""
    B, C, H, W = x.shape
    padded = x.new_empty(B, C, H + 2 * padding, W + 2 * padding)
    padded[:] = torch.tensor(fill if fill is not None else (0.0,) * C, dtype=x.dtype).view(1, C, 1, 1)
    padded[:, :, padding:padding + H, padding:padding + W] = x
    rows = (top[:, None] + torch.arange(H)).view(B, 1, H, 1)
    cols = (left[:, None] + torch.arange(W)).view(B, 1, 1, W)
    return padded[torch.arange(B).view(B, 1, 1, 1), torch.arange(C).view(1, C, 1, 1), rows, cols]
