"""Sparsity metrics of a model (docs/algorithms.md §6).

`layer_stats` counts the non-zeros of the epoch rows and the per-layer CSV (the FLOPs
account keeps its own per-step counts on the device, see `mlbreg.flops`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .models import prunable_modules


@torch.no_grad()
def layer_stats(model: nn.Module) -> list[dict]:
    """Per prunable layer: numel, non-zeros, density and (convs) zero / total 2-D kernels."""
    rows = []
    for name, mod in prunable_modules(model):
        w = mod.weight.detach()
        nnz = int(torch.count_nonzero(w))
        row = dict(
            layer=name,
            kind="conv" if w.dim() == 4 else "linear",
            shape="x".join(map(str, w.shape)),
            numel=w.numel(),
            nonzeros=nnz,
            density=nnz / w.numel(),
            kernels=0,
            zero_kernels=0,
        )
        if w.dim() == 4:
            kernel_nonzero = w.flatten(2).ne(0).any(-1)
            row["kernels"] = kernel_nonzero.numel()
            row["zero_kernels"] = int(kernel_nonzero.numel() - kernel_nonzero.sum())
        rows.append(row)
    return rows


@torch.no_grad()
def sparsity_summary(model: nn.Module, rows: list[dict] | None = None) -> dict[str, float]:
    """Sparsity in % over prunable weights, over all parameters, and of conv kernels."""
    rows = layer_stats(model) if rows is None else rows
    prunable = sum(r["numel"] for r in rows)
    prunable_nnz = sum(r["nonzeros"] for r in rows)
    prunable_ids = {id(m.weight) for _, m in prunable_modules(model)}
    other_numel = other_nnz = 0
    for p in model.parameters():
        if id(p) not in prunable_ids:
            other_numel += p.numel()
            other_nnz += int(torch.count_nonzero(p))
    kernels = sum(r["kernels"] for r in rows)
    zero_kernels = sum(r["zero_kernels"] for r in rows)
    return dict(
        sparsity_pct=100.0 * (1 - prunable_nnz / prunable),
        sparsity_all_params_pct=100.0 * (1 - (prunable_nnz + other_nnz) / (prunable + other_numel)),
        conv_sparsity_pct=100.0 * zero_kernels / kernels if kernels else float("nan"),  # nan: no conv layer
        nonzeros=prunable_nnz,
        prunable_params=prunable,
    )


def layer_nbytes(numel: int, nonzeros: int, itemsize: int = 4) -> int:
    """Bytes of one prunable weight in `mlbreg export`'s file: its non-zero values + the smaller
    position code (a bitmask of ceil(numel / 8) bytes or 4-byte indices)."""
    bitmask = math.ceil(numel / 8)
    indices = 4 * nonzeros
    return itemsize * nonzeros + min(bitmask, indices)


@torch.no_grad()
def model_bytes(model: nn.Module, rows: list[dict] | None = None) -> dict[str, int]:
    """Size of the model's state_dict: dense (as model.pt holds it) and compressed (as
    `mlbreg export` stores it: prunable weights as values + positions, the rest dense)."""
    rows = layer_stats(model) if rows is None else rows
    prunable = {f"{r['layer']}.weight": r for r in rows}
    dense = sparse = 0
    for name, t in model.state_dict().items():
        size = t.numel() * t.element_size()
        dense += size
        row = prunable.get(name)
        sparse += size if row is None else layer_nbytes(row["numel"], row["nonzeros"], t.element_size())
    return dict(model_bytes_dense=dense, model_bytes_sparse=sparse)
