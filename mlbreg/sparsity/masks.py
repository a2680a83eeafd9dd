"""Layer densities (uniform / ER / ERK) and sparse initialization (docs/algorithms.md §4).

`layer_densities` works on plain shapes, so it can be used on its own (and tested on
ResNet-18 / WRN-28-10 shapes without building anything); `sparse_init_` applies it to a
model: Kaiming-normal weights, an exact-count random mask per layer, and the
variance-preserving factor c/√p_l.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..models import prunable_modules
from ..optim.regularizers import group_dims

SCHEMES = ("uniform", "er", "erk")


def _raw_ratio(shape: tuple[int, ...], scheme: str) -> float:
    """The unnormalized density r_l of a layer; p_l = ε·r_l."""
    if scheme == "uniform":
        return 1.0
    if len(shape) == 4:
        c_out, c_in, kh, kw = shape
        if scheme == "erk":
            return (c_in + c_out + kh + kw) / (c_in * c_out * kh * kw)
        return (c_in + c_out) / (c_in * c_out)
    n_out, n_in = shape
    return (n_in + n_out) / (n_in * n_out)


def layer_densities(
    shapes: Mapping[str, tuple[int, ...]], density: float, scheme: str = "uniform", dense: tuple[str, ...] = ()
) -> dict[str, float]:
    """Per-layer densities p_l with Σ p_l·N_l = density·Σ N_l and p_l ≤ 1.

    ε is solved over the layers that are not dense; a layer whose p_l would exceed 1 is
    made dense and ε is solved again (RigL: the layers with the largest ratio go first).
    Layers named in `dense` are dense from the start and count towards the budget.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown mask scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if not 0 < density <= 1:
        raise ValueError(f"invalid density {density}; must be in (0, 1]")
    unknown = set(dense) - set(shapes)
    if unknown:
        raise ValueError(f"dense layers {sorted(unknown)} are not prunable layers; valid: {', '.join(shapes)}")
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    ratio = {name: _raw_ratio(shape, scheme) for name, shape in shapes.items()}
    budget = density * sum(numel.values())
    dense_set = set(dense)
    while True:
        sparse_layers = [n for n in shapes if n not in dense_set]
        if not sparse_layers:
            break
        remaining = budget - sum(numel[n] for n in dense_set)
        if remaining <= 0:
            raise ValueError(f"density {density} is too low for the layers kept dense ({sorted(dense_set)})")
        eps = remaining / sum(ratio[n] * numel[n] for n in sparse_layers)
        top = max(ratio[n] for n in sparse_layers)
        if eps * top <= 1:
            break
        dense_set |= {n for n in sparse_layers if ratio[n] == top}
    return {n: 1.0 if n in dense_set else eps * ratio[n] for n in shapes}


def exact_counts(numel: Mapping[str, int], densities: Mapping[str, float]) -> dict[str, int]:
    """Integer non-zero counts per layer: round(p_l·N_l) with largest-remainder rounding so
    that the overall count is the target (within one weight of density·Σ N)."""
    want = {n: densities[n] * numel[n] for n in numel}
    counts = {n: min(numel[n], math.floor(w)) for n, w in want.items()}
    missing = round(sum(want.values())) - sum(counts.values())
    # largest remainder first; the sort is stable, so equal remainders go in layer order
    for n in sorted(numel, key=lambda n: want[n] - counts[n], reverse=True):
        if missing <= 0:
            break
        if counts[n] < numel[n]:
            counts[n] += 1
            missing -= 1
    return counts


def _mask_units(weight: torch.Tensor, by_group: bool) -> tuple[int, ...]:
    """Shape of the mask that is drawn: one entry per group of the group regularizer (whole
    kernels / rows, the trailing dimensions `group_dims` reduces) or per weight."""
    if not by_group:
        return tuple(weight.shape)
    return tuple(size for d, size in enumerate(weight.shape) if d not in group_dims(weight))


def random_mask(shape: tuple[int, ...], count: int, generator: torch.Generator) -> torch.Tensor:
    """A 0/1 mask with exactly `count` ones at uniformly random positions."""
    n = math.prod(shape)
    flat = torch.zeros(n)
    flat[torch.randperm(n, generator=generator)[:count]] = 1.0
    return flat.view(shape)


@torch.no_grad()
def sparse_init_(
    model: nn.Module,
    density: float,
    scheme: str = "uniform",
    scale: float = 1.0,
    dense_first: bool = False,
    dense_last: bool = False,
    by_group: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Sparse initialization of every prunable weight; returns the layer densities used.

    W ← (c/√p_l)·(M ⊙ W_kaiming); with by_group the mask keeps whole kernels / rows, with
    exactly round(p_l·#groups) of them, so the group regularizer starts group-sparse.
    """
    layers = prunable_modules(model)
    if not layers:
        raise ValueError("the model has no Conv2d or Linear layer to sparsify")
    names = [name for name, _ in layers]
    dense = tuple(([names[0]] if dense_first else []) + ([names[-1]] if dense_last else []))
    shapes = {name: tuple(mod.weight.shape) for name, mod in layers}
    densities = layer_densities(shapes, density, scheme, dense)
    units = {name: _mask_units(mod.weight, by_group) for name, mod in layers}
    counts = exact_counts({n: math.prod(u) for n, u in units.items()}, densities)
    # a layer with no active unit cuts the network (e.g. 1% of a 10-row classifier drawn by
    # rows is 0 rows): keep at least one unit per layer
    counts = {n: max(c, 1) for n, c in counts.items()}
    generator = torch.Generator().manual_seed(seed)
    achieved = {}
    for name, mod in layers:
        w = torch.empty(mod.weight.shape)
        nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu", generator=generator)
        n_units = math.prod(units[name])
        mask = random_mask(units[name], counts[name], generator)
        mask = mask.view(mask.shape + (1,) * (w.dim() - mask.dim())).expand_as(w)
        p = counts[name] / n_units
        w.mul_(mask).mul_(scale / math.sqrt(p))  # p > 0: every layer keeps a unit
        mod.weight.copy_(w)
        achieved[name] = p
    return achieved


# -- fixed masks during training (RigL, prune_finetune) ---------------------------------
def momentum_buffers(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The momentum buffer of each parameter in a torch.optim.SGD (None before its first step)."""
    return [optimizer.state.get(p, {}).get("momentum_buffer") for p in params]


@torch.no_grad()
def apply_masks_(params: list[torch.Tensor], masks: list[torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
    """θ ← M ⊙ θ and, given the optimizer, b ← M ⊙ b for its momentum buffers (one
    multi-tensor kernel for both). After a masked SGD step this is all the masking needed:
    whatever the step did outside M is undone, θ and b there are 0 again."""
    tensors, factors = list(params), list(masks)
    if optimizer is not None:
        for b, m in zip(momentum_buffers(optimizer, params), masks):
            if b is not None:
                tensors.append(b)
                factors.append(m)
    torch._foreach_mul_(tensors, factors)
