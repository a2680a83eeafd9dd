"""Decoding image files once and caching the decoded tensors next to them (TinyImageNet).

The cache is a ``torch.save`` dict holding a fingerprint of the file list (names,
sizes, mtimes), read tensors-only (`mlbreg.safe_load`); a cache whose fingerprint
differs, or that cannot be read or holds any other Python object, is ignored and
rebuilt.  Writes are atomic, and a read-only data folder only costs
the cache, not the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..safe_load import TensorFileError, load_tensors

log = logging.getLogger(__name__)

_TINY_CACHE = "mlbreg_cache_v1.pt"


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
        blob = load_tensors(path, "cache")    # tensors-only: a crafted file runs no code, it is rebuilt
    except TensorFileError as e:  # a truncated or foreign file: rebuild it
        log.warning("ignoring %s; rebuilding it", e)
        return None
    return blob if isinstance(blob, dict) and blob.get("fingerprint") == fingerprint else None


def _write_cache(path: Path, blob: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    except OSError as e:  # e.g. a read-only data folder: run on without the cache
        log.warning("could not write cache %s (%s)", path, e)
        tmp.unlink(missing_ok=True)
