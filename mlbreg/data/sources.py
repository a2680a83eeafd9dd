"""The data sets: each is read whole into memory, one :class:`Split` per side (train/test).

Images are ``uint8`` NCHW (0..255) or, for data that is not 8-bit, ``float32`` in
its natural scale.  Loaders are registered by name in :data:`DATASETS`; a missing
file raises :class:`DataNotFoundError` saying what to put where.
"""

from __future__ import annotations

import inspect
import logging
import os
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..registry import Registry
from .cache import _TINY_CACHE, _fingerprint, _read_cache, _read_jpegs, _write_cache

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MNIST_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}

# name -> DatasetSource; iterating it gives the names
DATASETS = Registry("dataset")


class DataNotFoundError(FileNotFoundError):
    """The dataset's files are not where they are expected; the message says what to put where."""


@dataclass
class Split:
    x: torch.Tensor  # (N, C, H, W) uint8 (0..255) or float32 (natural scale)
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    in_shape: tuple[int, int, int]
    mean: tuple[float, ...]  # per channel, in the scale after uint8 -> [0, 1]
    std: tuple[float, ...]
    augment: bool  # random crop (pad 4) + horizontal flip on train batches


@dataclass(frozen=True)
class DatasetSource:
    """One data set: its loader ``load(root, download, **options) -> Dataset`` and what is known
    without loading it (so that checking a config or reading a run's model needs no data)."""
    load: Callable[..., Dataset]
    missing: Callable[[str], str | None] | None = None   # root -> what to put where (None: bundled or generated)
    num_classes: int | None = None                         # None: set by the config (synthetic)
    in_shape: tuple[int, int, int] | None = None
    sizes: tuple[int, int] | None = None                   # (train, test) images at the default options


def dataset(name: str, **facts):
    """Register the decorated loader as data set `name`, with the facts of `DatasetSource`."""
    def add(load):
        DATASETS.register(name, DatasetSource(load, **facts))
        return load
    return add


def load_dataset(name: str, root: str = "data", download: bool = False, **options) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) whole into memory.

    ``root`` is the data folder; ``download`` lets torchvision (or, for
    TinyImageNet, this module) fetch missing files.  ``options`` are per-dataset
    keyword arguments (see the ``_load_<name>`` functions).  Missing files raise
    :class:`DataNotFoundError` (a ``FileNotFoundError``) saying what to put where.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS.names()}")
    loader = DATASETS.get(name).load
    # Say which options are valid instead of Python's bare "unexpected keyword".
    valid = [p for p in inspect.signature(loader).parameters if p not in ("root", "download")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for dataset {name!r}; valid options: {valid}")
    try:
        return loader(root=os.fspath(root), download=download, **options)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        # download=True without a network: the same what-to-put-where as without download
        where = missing_data(name, os.fspath(root)) or ""
        raise DataNotFoundError(f"downloading {name} failed ({err}). {where}".strip()) from err


def missing_data(name: str, root: str, download: bool = False) -> str | None:
    """What to put where, if dataset `name`'s files are not under `root`; None when they
    are there (or will be downloaded, or the data set is generated or bundled). Cheap: it
    only looks for files, so the config check runs it before a run directory exists."""
    source = DATASETS.get(name) if name in DATASETS else None
    if download or source is None or source.missing is None:
        return None
    return source.missing(os.fspath(root))


# --------------------------------------------------------------------------- expected files


_DOWNLOAD_HINT = "or set dataset.download=true (download=True in Python)."
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
_CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")


def _cifar10_message(root: str, missing_only: bool = True) -> str | None:
    base = Path(root) / "cifar-10-batches-py"
    if missing_only and all((base / f).exists() for f in _CIFAR_FILES):
        return None
    return (f"CIFAR-10 not found or corrupted: expected {_abs(root)}/cifar-10-batches-py/"
            f"{{data_batch_1..5,test_batch,batches.meta}} (the python version). Download {CIFAR10_URL} "
            f"and extract it into {_abs(root)}, {_DOWNLOAD_HINT}")


def _mnist_like_message(name: str, root: str, missing_only: bool = True) -> str | None:
    folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name]
    raw = Path(root) / folder / "raw"
    if missing_only and all((raw / f).exists() for f in _MNIST_FILES):
        return None
    return (f"{folder} not found: expected the unzipped idx files {_abs(root)}/{folder}/raw/"
            f"{{{','.join(_MNIST_FILES)}}}. Download the .gz files from {MNIST_URLS[name]} and gunzip "
            f"them there, {_DOWNLOAD_HINT}")


def _tinyimagenet_needed(root: str) -> tuple[Path, list[Path]]:
    base = Path(root) / "tiny-imagenet-200"
    return base, [base / "wnids.txt", base / "train", base / "val" / "val_annotations.txt", base / "val" / "images"]


def _tinyimagenet_message(root: str) -> str | None:
    base, needed = _tinyimagenet_needed(root)
    missing = [str(p.relative_to(base)) for p in needed if not p.exists()]
    if not missing:
        return None
    return (f"TinyImageNet not found: expected {_abs(base)}/ with wnids.txt, train/<wnid>/images/*.JPEG, "
            f"val/images/*.JPEG and val/val_annotations.txt (missing: {', '.join(missing)}). "
            f"Download {TINYIMAGENET_URL} and unzip it into {_abs(root)}, {_DOWNLOAD_HINT}")


# --------------------------------------------------------------------------- loaders


@dataset("digits", num_classes=10, in_shape=(1, 8, 8), sizes=(1437, 360))
def _load_digits(root: str, download: bool, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """sklearn's 8x8 digits (bundled with sklearn, so root/download are unused)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.data.reshape(-1, 1, 8, 8) / 16.0).float()  # 0..16 -> [0, 1]
    y = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=digits.target, random_state=split_seed
    )
    # Sorted so a split is a plain subset in file order; the loader does the shuffling.
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    train, test = Split(x[train_idx], y[train_idx]), Split(x[test_idx], y[test_idx])
    mean, std = _channel_stats(train.x)
    return Dataset("digits", train, test, 10, (1, 8, 8), mean, std, augment=False)


@dataset("cifar10", missing=_cifar10_message, num_classes=10, in_shape=(3, 32, 32), sizes=(50_000, 10_000))
def _load_cifar10(root: str, download: bool) -> Dataset:
    from torchvision.datasets import CIFAR10

    splits = []
    for is_train in (True, False):
        try:
            ds = CIFAR10(root, train=is_train, download=download)
        except RuntimeError as e:
            if "not found" not in str(e).lower():
                raise
            raise DataNotFoundError(_cifar10_message(root, missing_only=False)) from e
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW uint8
        splits.append(Split(x, torch.tensor(ds.targets, dtype=torch.long)))
    return Dataset(
        "cifar10", *splits, num_classes=10, in_shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), augment=True,
    )


@dataset("tinyimagenet", missing=_tinyimagenet_message, num_classes=200, in_shape=(3, 64, 64),
         sizes=(100_000, 10_000))
def _load_tinyimagenet(root: str, download: bool, cache: bool = True) -> Dataset:
    """TinyImageNet-200 from its standard folder layout; the labelled val split is the test split.

    Class index = position in the *sorted* wnids of wnids.txt, which is also
    what torchvision's ImageFolder gives on train/, so indices agree with
    ImageFolder-based code.  mean/std are computed from the train split (and
    cached) rather than borrowed from ImageNet.  The decoded uint8 arrays are
    cached in ``tiny-imagenet-200/mlbreg_cache_v1.pt``; the cache is rebuilt when
    the fingerprint of the file list (names, sizes, mtimes) changes.
    """
    base, needed = _tinyimagenet_needed(root)
    if download and not all(p.exists() for p in needed):
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(TINYIMAGENET_URL, download_root=root)
    message = _tinyimagenet_message(root)
    if message:
        raise DataNotFoundError(message)

    wnids, (train_files, train_labels), (test_files, test_labels) = _tinyimagenet_files(base)
    fingerprint = _fingerprint(base, [base / "wnids.txt", *train_files, *test_files])
    cache_path = base / _TINY_CACHE
    blob = _read_cache(cache_path, fingerprint) if cache else None
    if blob is None:
        log.info("decoding %d TinyImageNet JPEGs (once; cached in %s)", len(train_files) + len(test_files), cache_path)
        train_x = _read_jpegs(train_files)
        mean, std = _channel_stats(train_x)
        blob = {
            "fingerprint": fingerprint, "wnids": wnids, "mean": mean, "std": std,
            "train_x": train_x, "train_y": torch.tensor(train_labels, dtype=torch.long),
            "test_x": _read_jpegs(test_files), "test_y": torch.tensor(test_labels, dtype=torch.long),
        }
        if cache:
            _write_cache(cache_path, blob)
    return Dataset(
        "tinyimagenet", Split(blob["train_x"], blob["train_y"]), Split(blob["test_x"], blob["test_y"]),
        num_classes=len(wnids), in_shape=(3, 64, 64),
        mean=tuple(blob["mean"]), std=tuple(blob["std"]), augment=True,
    )


def _tinyimagenet_files(base: Path):
    """Sorted wnids, then (files, labels) of train (sorted per class) and of val (annotation order)."""
    wnids = sorted({w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    train_files, train_labels = [], []
    for wnid in wnids:
        files = sorted((base / "train" / wnid / "images").glob("*.JPEG"))
        train_files += files
        train_labels += [index[wnid]] * len(files)
    test_files, test_labels = [], []
    for line in (base / "val" / "val_annotations.txt").read_text().splitlines():
        if line.strip():
            fname, wnid = line.split("\t")[:2]
            test_files.append(base / "val" / "images" / fname)
            test_labels.append(index[wnid])
    if not train_files:
        raise DataNotFoundError(f"TinyImageNet: no training images under {_abs(base)}/train/<wnid>/images/*.JPEG")
    return wnids, (train_files, train_labels), (test_files, test_labels)


def _load_mnist_like(name: str, root: str, download: bool) -> Dataset:
    from torchvision.datasets import MNIST, FashionMNIST

    cls, mean, std = {
        "mnist": (MNIST, (0.1307,), (0.3081,)),
        "fashion_mnist": (FashionMNIST, (0.2860,), (0.3530,)),
    }[name]
    splits = []
    for is_train in (True, False):
        try:
            ds = cls(root, train=is_train, download=download)
        except RuntimeError as e:
            if "not found" not in str(e).lower():
                raise
            raise DataNotFoundError(_mnist_like_message(name, root, missing_only=False)) from e
        splits.append(Split(ds.data.unsqueeze(1).contiguous(), ds.targets.long()))
    return Dataset(name, *splits, num_classes=10, in_shape=(1, 28, 28), mean=mean, std=std, augment=False)


@dataset("mnist", missing=lambda root: _mnist_like_message("mnist", root), num_classes=10, in_shape=(1, 28, 28),
         sizes=(60_000, 10_000))
def _load_mnist(root: str, download: bool) -> Dataset:
    return _load_mnist_like("mnist", root, download)


@dataset("fashion_mnist", missing=lambda root: _mnist_like_message("fashion_mnist", root), num_classes=10,
         in_shape=(1, 28, 28), sizes=(60_000, 10_000))
def _load_fashion_mnist(root: str, download: bool) -> Dataset:
    return _load_mnist_like("fashion_mnist", root, download)


@dataset("synthetic")
def _load_synthetic(
    root: str, download: bool, shape=(3, 32, 32), num_classes: int = 10,
    train_size: int = 1024, test_size: int = 256, seed: int = 0, augment: bool = False,
) -> Dataset:
    """Random uint8 images and labels, for benchmarks and smoke tests (root/download unused)."""
    shape = tuple(int(s) for s in shape)  # may arrive as a list from a config
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        return Split(x, torch.randint(0, num_classes, (n,), generator=g))

    train, test = split(train_size), split(test_size)
    return Dataset(
        "synthetic", train, test, num_classes=num_classes, in_shape=shape,
        mean=(0.5,) * shape[0], std=(0.25,) * shape[0], augment=augment,
    )


# --------------------------------------------------------------------------- helpers


def _abs(path) -> str:
    # Hydra changes the working directory, so relative paths in messages mislead.
    return os.path.abspath(path)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std, in [0, 1] scale for uint8 input.

    Accumulated in float64 over chunks so 100k 64x64 images need no float copy.
    """
    scale = 1 / 255 if x.dtype == torch.uint8 else 1.0
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in x.split(4096):
        c = chunk.double().mul_(scale)
        total += c.sum(dim=(0, 2, 3))
        total_sq += c.square().sum(dim=(0, 2, 3))
    count = x.numel() / x.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
