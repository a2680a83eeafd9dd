"""Regularizers J, their proximal maps and subgradients (docs/algorithms.md §1).

Everything here is a pure function of tensors and plain numbers, so optimizers can keep
only strings ("l1", "group", "l1_group", "none") in their param groups and their
`state_dict()` stays picklable and loadable (the LinBreg reference keeps regularizer
objects in param groups, which breaks that).

The prox is always applied to δ·v with threshold δ·λ, and for every J here
prox_{δJ}(δ·v) = δ·shrink(v, λ) (positive homogeneity), so the functions below take the
dual variable v and return δ·shrink(v, λ) directly.

Groups for `group`: each 2-D kernel θ[o, i, :, :] of a conv weight (n_g = kh·kw), each row
θ[o, :] of a linear weight (n_g = in_features); a 1-D tensor is one group per entry.
"""

from __future__ import annotations

import math

import torch

REGULARIZERS = ("l1", "group", "l1_group", "none")


def check_regularizer(name: str) -> str:
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; valid: {', '.join(REGULARIZERS)}")
    return name


def group_dims(x: torch.Tensor) -> tuple[int, ...]:
    """Dimensions reduced to form one group: kernels for 4-D, rows for 2-D weights."""
    if x.dim() == 4:
        return (2, 3)
    if x.dim() == 2:
        return (1,)
    if x.dim() == 1:
        return ()
    raise ValueError(f"group regularizer needs a 1-D, 2-D (linear) or 4-D (conv) tensor, got shape {tuple(x.shape)}")


def group_size(x: torch.Tensor) -> int:
    """n_g: the number of entries in one group of this tensor."""
    return math.prod([x.shape[d] for d in group_dims(x)])  # a list: torch.compile traces it


def group_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x_g‖₂ per group, broadcastable against x (keepdim)."""
    dims = group_dims(x)
    if not dims:
        return x.abs()
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True)


def soft_shrink_(x: torch.Tensor, t: float) -> torch.Tensor:
    """In place: sign(x)·max(|x| − t, 0), written as x − clamp(x, −t, t) so that entries
    with |x| ≤ t become exactly 0 and t = 0 is the identity."""
    if t != 0:
        x.sub_(x.clamp(-t, t))
    return x


def group_shrink_(x: torch.Tensor, t: float) -> torch.Tensor:
    """In place: x_g·max(1 − t·√n_g/‖x_g‖, 0) for every group (zero groups stay zero)."""
    if t == 0:
        return x
    thresh = t * math.sqrt(group_size(x))
    norms = group_norms(x)
    # clamp_min avoids 0/0 for zero groups; their factor is 0 anyway
    factor = (1.0 - thresh / norms.clamp_min(torch.finfo(x.dtype).tiny)).clamp_min_(0.0)
    return x.mul_(factor)


def prox_(theta: torch.Tensor, v: torch.Tensor, reg: str, lam: float, delta: float) -> None:
    """θ ← prox_{δJ}(δ·v) = δ·shrink(v, λ), written into θ in place."""
    if reg == "l1":
        if lam != 0:
            # one fused kernel, bitwise equal to v − clamp(v, −λ, λ)
            torch.ops.aten.softshrink.out(v, lam, out=theta)
        else:
            theta.copy_(v)
    elif reg == "group":
        group_shrink_(theta.copy_(v), lam)
    elif reg == "l1_group":
        # exact prox of the sparse group lasso: soft-shrink, then group-shrink
        group_shrink_(soft_shrink_(theta.copy_(v), lam), lam)
    else:
        theta.copy_(v)
        check_regularizer(reg)
    if delta != 1.0:
        theta.mul_(delta)


def foreach_l1_prox_(thetas: list[torch.Tensor], vs: list[torch.Tensor], lam: float, delta: float) -> None:
    """Multi-tensor version of `prox_` for l1: the same operations, fewer kernel launches."""
    torch._foreach_copy_(thetas, vs)
    if lam != 0:
        clamped = torch._foreach_clamp_max(torch._foreach_clamp_min(vs, -lam), lam)
        torch._foreach_sub_(thetas, clamped)
    if delta != 1.0:
        torch._foreach_mul_(thetas, delta)


def subgradient(theta: torch.Tensor, reg: str, lam: float) -> torch.Tensor:
    """A subgradient p ∈ ∂J(θ) (0 on zero entries / zero groups), used for v₀ = θ₀/δ + p."""
    if reg == "none" or lam == 0:
        return torch.zeros_like(theta)
    p = torch.zeros_like(theta)
    if reg in ("l1", "l1_group"):
        p.add_(torch.sign(theta), alpha=lam)
    if reg in ("group", "l1_group"):
        norms = group_norms(theta)
        scale = lam * math.sqrt(group_size(theta))
        p.add_(torch.where(norms > 0, theta / norms.clamp_min(torch.finfo(theta.dtype).tiny), 0.0), alpha=scale)
    if reg not in ("l1", "group", "l1_group"):
        check_regularizer(reg)
    return p


def support(theta: torch.Tensor, reg: str) -> torch.Tensor:
    """The restriction operator R as a 0/1 mask of θ's dtype: non-zero entries, or for the
    `group` regularizer whole groups with any non-zero entry (so coarse steps freeze whole
    kernels)."""
    nonzero = theta != 0
    if reg == "group":
        dims = group_dims(theta)
        if dims:
            nonzero = nonzero.any(dim=dims[0], keepdim=True) if len(dims) == 1 else nonzero.flatten(2).any(-1)[..., None, None]
            nonzero = nonzero.expand_as(theta)
    return nonzero.to(theta.dtype)


def regularizer_value(theta: torch.Tensor, reg: str, lam: float) -> float:
    """J(θ) (for logging and tests)."""
    if reg == "none":
        return 0.0
    value = 0.0
    if reg in ("l1", "l1_group"):
        value += lam * theta.abs().sum().item()
    if reg in ("group", "l1_group"):
        value += lam * math.sqrt(group_size(theta)) * group_norms(theta).sum().item()
    return value
