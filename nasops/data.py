"""Data sets and loaders of the search driver.

Data sets (``load(name, ...)``), all held in memory as one image tensor:

- ``digits`` (default): scikit-learn's 8x8 handwritten digits, 1797 grey images
  of 10 classes. It ships inside scikit-learn, so a fresh machine runs a search
  with no download. Pixels (0..16) are scaled to [0, 1] and normalised with the
  data set's mean and standard deviation.
- ``cifar10`` / ``cifar100``: the standard python-pickle batches of
  https://www.cs.toronto.edu/~kriz/cifar.html, extracted into ``data_dir``
  (``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` for CIFAR-10,
  ``train`` and ``test`` for CIFAR-100; the ``cifar-10-batches-py`` /
  ``cifar-100-python`` folder itself or its parent). Normalised with the usual
  per-channel CIFAR means and standard deviations. No augmentation: the search
  sees the plain images (DARTS's random crop and flip are a training-time
  regulariser we leave to the final training of the found cell).
- ``synthetic``: Gaussian noise images of any size with uniformly random labels,
  generated from the seed: for speed measurements only.

A search uses the *training* set only (the test set is for the final training of
the found cell). As in DARTS, it is split at random (seeded) into a train part
for the network weights and a validation part for the architecture
(``train_portion`` of it goes to the weights; 0.5 by default).

Loaders are pure functions of (seed, epoch, rank): no hidden iterator state, so
a resumed run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "cifar100", "synthetic")

_CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
_CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
_CIFAR_FILES = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)]),
                "cifar100": ("cifar-100-python", ["train"])}


@dataclass
class ImageDataset:
    """Images and labels in memory. ``images`` is (N, C, H, W), either float32
    (already normalised) or uint8 (normalised per batch with ``mean``/``std``, so
    CIFAR takes 150 MB rather than 600 MB per process)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float32 normalised, labels int64) of the given sample indices."""
        x = self.images[index]
        if x.dtype == torch.uint8:
            mean = torch.tensor(self.mean).view(1, -1, 1, 1)
            std = torch.tensor(self.std).view(1, -1, 1, 1)
            x = (x.float() / 255.0 - mean) / std
        return x, self.labels[index]


def load(name: str, *, data_dir: str | None = None, image_size: int = 32, num_classes: int = 10,
         synthetic_size: int = 512, seed: int = 0) -> ImageDataset:
    """The training set of data set ``name`` (one of DATASETS).

    ``image_size``, ``num_classes`` and ``synthetic_size`` shape the synthetic
    set only; ``data_dir`` is where the CIFAR batches are.
    """
    if name == "digits":
        return _digits()
    if name in ("cifar10", "cifar100"):
        return _cifar(name, data_dir)
    if name == "synthetic":
        return _synthetic(image_size, num_classes, synthetic_size, seed)
    raise ValueError(f"dataset: expected one of {', '.join(DATASETS)}; got {name!r}")


def _digits() -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return ImageDataset("digits", x.contiguous(), y, num_classes=10)


def _cifar(name: str, data_dir: str | None) -> ImageDataset:
    folder, files = _CIFAR_FILES[name]
    if not data_dir:
        raise ValueError(f"dataset {name}: give --data-dir, the folder holding {folder}/ "
                         f"(the python version from https://www.cs.toronto.edu/~kriz/cifar.html)")
    root = os.path.join(data_dir, folder) if os.path.isdir(os.path.join(data_dir, folder)) else data_dir
    images, labels = [], []
    for fname in files:
        path = os.path.join(root, fname)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset {name}: missing {path} (expected the python-pickle "
                                    f"batches {', '.join(files)} in {root})")
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry["labels" if name == "cifar10" else "fine_labels"], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(images))
    y = torch.from_numpy(np.concatenate(labels))
    return ImageDataset(name, x, y, num_classes=10 if name == "cifar10" else 100,
                        mean=_CIFAR_MEAN[name], std=_CIFAR_STD[name])


def _synthetic(image_size: int, num_classes: int, size: int, seed: int) -> ImageDataset:
    if image_size < 1 or num_classes < 2 or size < 2:
        raise ValueError(f"synthetic data: need image_size >= 1, num_classes >= 2, size >= 2; got "
                         f"image_size={image_size}, num_classes={num_classes}, size={size}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 3, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (size,), generator=g)
    return ImageDataset("synthetic", x, y, num_classes=num_classes)


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
