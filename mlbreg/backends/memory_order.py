"""Flat positions of a dense tensor's elements in memory order, whatever its memory format: the swapped
layers gather their values from (and scatter gradients into) weights that may be channels_last."""

from __future__ import annotations

import torch


def memory_flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's elements in memory order (any memory format, e.g. channels_last)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def memory_index(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row-major positions `idx` of t's elements as positions in t's memory order (``memory_flat``)."""
    if t.is_contiguous():
        return idx
    strides = torch.tensor(t.stride(), dtype=torch.int64)
    pos, rest = torch.zeros_like(idx), idx
    for d in range(t.dim() - 1, -1, -1):
        pos += (rest % t.shape[d]) * strides[d]
        rest = rest // t.shape[d]
    return pos
