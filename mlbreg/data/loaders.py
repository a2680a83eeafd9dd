"""Epoch loaders: batches of a :class:`~mlbreg.data.sources.Split`, the same for a run resumed mid-way.

:class:`BatchLoader` moves a split to the training device once and builds each
batch with whole-batch tensor ops (shuffle, random crop with zero padding 4,
horizontal flip, normalization) - no DataLoader workers, no PIL in the loop.
This follows KellerJordan/cifar10-airbench: at the small image sizes used here,
per-sample Python transforms, not the model, are the bottleneck.
:class:`TorchvisionLoader` is the classic DataLoader + PIL transforms pipeline.

Randomness of an epoch depends only on ``(seed, epoch)`` so that a run resumed
at epoch ``e`` sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import Registry
from .sources import Split

PAD = 4  # random-crop padding, as torchvision's RandomCrop(32, padding=4)



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


LOADERS = Registry("loader")
LOADERS.register("tensor", BatchLoader)
LOADERS.register("torchvision", TorchvisionLoader)


def make_loader(kind: str, split: Split, batch_size: int, mean, std, **kwargs):
    """`tensor` (default: whole-batch tensor ops on the device) or `torchvision`."""
    loader = LOADERS.get(kind)  # unknown: "unknown loader 'x'; valid: tensor, torchvision"
    if kind == "tensor":
        kwargs.pop("num_workers", None)
    return loader(split, batch_size, mean, std, **kwargs)
