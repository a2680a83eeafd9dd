"""Datasets held in memory as whole tensors, and tensor-based batch loaders.

- :mod:`.sources`: the data sets (:class:`Split`, :class:`Dataset`, :func:`load_dataset`,
  :func:`missing_data`, the per-dataset loaders registered in :data:`DATASETS`).
- :mod:`.cache`: decoding image files once and caching the tensors (TinyImageNet).
- :mod:`.loaders`: the epoch loaders (:class:`BatchLoader`, :class:`TorchvisionLoader`,
  :func:`make_loader`, :data:`LOADERS`); an epoch's randomness depends only on (seed, epoch).
"""

from .loaders import LOADERS, PAD, BatchLoader, TorchvisionLoader, make_loader
from .sources import (CIFAR10_URL, DATASETS, MNIST_URLS, TINYIMAGENET_URL, DataNotFoundError, Dataset, Split,
                      load_dataset, missing_data)

__all__ = [
    "CIFAR10_URL", "DATASETS", "LOADERS", "MNIST_URLS", "PAD", "TINYIMAGENET_URL", "BatchLoader",
    "DataNotFoundError", "Dataset", "Split", "TorchvisionLoader", "load_dataset", "make_loader", "missing_data",
]
