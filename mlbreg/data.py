"""Datasets held in memory as whole tensors, and a tensor-based batch loader.

Every dataset is read once into a :class:`Split` per side (train/test): images
as ``uint8`` NCHW (0..255) or, for data that is not 8-bit, ``float32`` in its
natural scale.  :class:`BatchLoader` moves a split to the training device once
and builds each batch with whole-batch tensor ops (shuffle, random crop with
zero padding 4, horizontal flip, normalization) - no DataLoader workers, no PIL
in the loop.  This follows KellerJordan/cifar10-airbench: at the small image
sizes used here, per-sample Python transforms, not the model, are the bottleneck.

Randomness of an epoch depends only on ``(seed, epoch)`` so that a run resumed
at epoch ``e`` sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import random
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MNIST_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}

PAD = 4  # random-crop padding, as torchvision's RandomCrop(32, padding=4)


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


def load_dataset(name: str, root: str = "data", download: bool = False, **options) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) whole into memory.

    ``root`` is the data folder; ``download`` lets torchvision (or, for
    TinyImageNet, this module) fetch missing files.  ``options`` are per-dataset
    keyword arguments (see the ``_load_<name>`` functions).  Missing files raise
    :class:`DataNotFoundError` (a ``FileNotFoundError``) saying what to put where.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    loader = _LOADERS[name]
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
    if download or name not in _EXPECTED:
        return None
    return _EXPECTED[name](os.fspath(root))


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


_EXPECTED = {
    "cifar10": _cifar10_message,
    "mnist": lambda root: _mnist_like_message("mnist", root),
    "fashion_mnist": lambda root: _mnist_like_message("fashion_mnist", root),
    "tinyimagenet": _tinyimagenet_message,
}


# --------------------------------------------------------------------------- loaders


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


def _load_mnist(root: str, download: bool) -> Dataset:
    return _load_mnist_like("mnist", root, download)


def _load_fashion_mnist(root: str, download: bool) -> Dataset:
    return _load_mnist_like("fashion_mnist", root, download)


_TINY_CACHE = "mlbreg_cache_v1.pt"


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


_LOADERS = {
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    "tinyimagenet": _load_tinyimagenet,
    "mnist": _load_mnist,
    "fashion_mnist": _load_fashion_mnist,
    "synthetic": _load_synthetic,
}
DATASETS = tuple(_LOADERS)


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


def _read_jpegs(files: list[Path]) -> torch.Tensor:
    from PIL import Image

    out = np.empty((len(files), 64, 64, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"))  # a few TinyImageNet images are grayscale
        if a.shape != (64, 64, 3):
            raise ValueError(f"{f}: expected a 64x64 image, got {a.shape[1]}x{a.shape[0]}")
        out[i] = a
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _fingerprint(base: Path, files: list[Path]) -> str:
    # Names, sizes and mtimes: catches added, removed, replaced or re-extracted files
    # without reading the images (one stat per file).
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(base)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_cache(path: Path, fingerprint: str):
    if not path.exists():
        return None
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file: rebuild it
        log.warning("ignoring unreadable cache %s (%s)", path, e)
        return None
    return blob if blob.get("fingerprint") == fingerprint else None


def _write_cache(path: Path, blob: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    except OSError as e:  # e.g. a read-only data folder: run on without the cache
        log.warning("could not write cache %s (%s)", path, e)
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- batches


class _EpochLoader:
    """What both loaders share: batches per epoch, and one generator per (seed, epoch)."""
    batch_size: int
    drop_last: bool
    num_samples: int
    seed: int
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _epoch_generator(self, device) -> torch.Generator:
        g = torch.Generator(device=device)
        # Large odd multiplier so (seed, epoch) pairs don't collide for any sane epoch count;
        # masked to the 64 bits manual_seed accepts (negative seeds allowed).
        g.manual_seed((self.seed * 1_000_003 + self.epoch) & 0xFFFF_FFFF_FFFF_FFFF)
        return g


class BatchLoader(_EpochLoader):
    """Batches of a :class:`Split` made with tensor ops on ``device``.

    The split is moved to ``device`` once (uint8 stays uint8, so CIFAR-10 takes
    150 MB, not 600); each batch is converted to float32 and normalized as
    ``(x / 255 - mean) / std`` (no /255 for float splits).  With ``augment``,
    each sample is randomly cropped from the image zero-padded by 4 (zero
    *pixels*: padding happens before normalization, as in torchvision's
    RandomCrop(padding=4)) and flipped horizontally with probability 1/2.

    The permutation, crops and flips of an epoch come from one generator seeded
    with ``(seed, epoch)``; call :meth:`set_epoch` before each epoch (like
    DistributedSampler), otherwise every epoch repeats epoch 0.
    """

    def __init__(self, split: Split, batch_size: int, mean, std, *, shuffle: bool, augment: bool,
                 drop_last: bool = False, device="cpu", seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        channels = split.x.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values (one per channel), got {len(mean)}/{len(std)}")
        self.device = torch.device(device)
        self.x = split.x.to(self.device)
        self.y = split.y.to(self.device, torch.long)
        self.scale = 1 / 255 if self.x.dtype == torch.uint8 else 1.0
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        self.seed, self.epoch, self.num_samples = seed, 0, len(self.y)

    def __iter__(self):
        g = self._epoch_generator(self.device)
        n = len(self.y)
        if self.shuffle:
            order = torch.randperm(n, generator=g, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.x[idx]
            if self.augment:
                x = self._flip(self._crop(x, g), g)
            yield (x.to(torch.float32) * self.scale - self.mean) / self.std, self.y[idx]

    def _crop(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Per-sample random HxW window of the zero-padded batch, via two gathers."""
        b, c, h, w = x.shape
        padded = F.pad(x, (PAD, PAD, PAD, PAD))  # raw scale: zero is a black pixel
        dy = torch.randint(0, 2 * PAD + 1, (b,), generator=g, device=x.device)
        dx = torch.randint(0, 2 * PAD + 1, (b,), generator=g, device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        # expand() is a view: no (B, C, H, W) int64 index is materialized.
        padded = padded.gather(2, rows.expand(b, c, h, w + 2 * PAD))
        return padded.gather(3, cols.expand(b, c, h, w))

    def _flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        flip = torch.rand(len(x), generator=g, device=x.device) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


class TorchvisionLoader(_EpochLoader):
    """The classic pipeline (`dataset.loader=torchvision`): a `torch.utils.data.DataLoader`
    with worker processes and torchvision transforms on PIL images (RandomCrop(padding=4),
    RandomHorizontalFlip, ToTensor, Normalize). Slower than :class:`BatchLoader`, kept for
    comparison and for transforms that only exist for PIL images. Same interface; the
    order and the augmentation of an epoch depend only on (seed, epoch), as there."""

    def __init__(self, split: Split, batch_size: int, mean, std, *, shuffle: bool, augment: bool,
                 drop_last: bool = False, device="cpu", seed: int = 0, num_workers: int = 2):
        from torchvision import transforms

        steps = [transforms.RandomCrop(split.x.shape[-1], padding=PAD), transforms.RandomHorizontalFlip()] \
            if augment else []
        if split.x.dtype == torch.uint8:
            steps = [transforms.ToPILImage()] + steps + [transforms.ToTensor()]
        self.dataset = _TransformedSplit(split, transforms.Compose(steps + [transforms.Normalize(mean, std)]))
        self.device = torch.device(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.num_workers, self.seed, self.epoch, self.num_samples = num_workers, seed, 0, len(split.y)

    def __iter__(self):
        g = self._epoch_generator(torch.device("cpu"))
        # the generator seeds both the order and every worker's transform RNG
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last,
            num_workers=self.num_workers, generator=g, worker_init_fn=_seed_worker,
            pin_memory=self.device.type == "cuda")
        batches = iter(loader)
        # without workers the transforms draw from this process's torch RNG: give them their own
        # stream, seeded from (seed, epoch), and keep the training code's stream untouched
        rng = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=g))).get_state()
        while True:
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(rng)
                batch = next(batches, None)
                rng = torch.get_rng_state()
            if batch is None:
                return
            x, y = batch
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class _TransformedSplit(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split.y)

    def __getitem__(self, i):
        x = self.split.x[i]
        if x.dtype != torch.uint8:   # float data (digits): tensors all the way
            x = x.clone()
        return self.transform(x), int(self.split.y[i])


def _seed_worker(worker_id: int) -> None:
    # torchvision's random transforms draw from torch's RNG, which DataLoader seeds per worker
    # from its generator; python's and numpy's are seeded from it for anything else
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


LOADERS = {"tensor": BatchLoader, "torchvision": TorchvisionLoader}


def make_loader(kind: str, split: Split, batch_size: int, mean, std, **kwargs):
    """`tensor` (default: whole-batch tensor ops on the device) or `torchvision`."""
    if kind not in LOADERS:
        raise ValueError(f"unknown loader {kind!r}; valid: {', '.join(LOADERS)}")
    if kind == "tensor":
        kwargs.pop("num_workers", None)
    return LOADERS[kind](split, batch_size, mean, std, **kwargs)
