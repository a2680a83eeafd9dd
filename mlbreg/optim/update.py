"""The functional core of LinBreg and ML LinBreg: one step on the tensors of a param group
(docs/algorithms.md §2-§3), as a per-tensor loop or a multi-tensor `torch._foreach_*` path behind
one signature; `mlbreg.optim.linbreg` holds the optimizers around it.
"""

from __future__ import annotations

import torch

from .regularizers import foreach_l1_prox_, prox_

__all__ = ["linbreg_update"]


def linbreg_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    duals: list[torch.Tensor | None],
    bufs: list[torch.Tensor | None],
    masks: list[torch.Tensor] | None = None,
    support_out: list[torch.Tensor] | None = None,
    *,
    lr: float | torch.Tensor,
    reg: str,
    lam: float,
    delta: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    foreach: bool,
    momentum_style: str = "torch",
) -> None:
    """One LinBreg step on a list of tensors of one param group.

    `duals` hold v (ignored for reg == "none", where the step is SGD on θ itself).
    `bufs` hold the momentum buffers; None entries are created (b = g) and written back
    into the list. `masks` (0/1, same dtype) restrict the step to the support: b and v
    change only where the mask is 1 (a coarse step of ML LinBreg). `support_out` (0/1
    masks of θ's dtype, for elementwise regularizers) receive the new support {θ ≠ 0} in
    place: ML LinBreg's fine step, without allocating new masks."""
    if not params:
        return
    if weight_decay != 0:
        grads = (
            torch._foreach_add(grads, params, alpha=weight_decay)
            if foreach
            else [g.add(p, alpha=weight_decay) for g, p in zip(grads, params)]
        )
    if momentum != 0 and momentum_style == "reference":
        # b ← β·b + (1 − β)·τ·g from b = 0, then v ← v − b: the torch-style update of the
        # scaled gradient x = (1 − β)·τ·g with d = 0 (b = x on the first step is β·0 + x)
        grads = _scaled(grads, lr, 1 - momentum, foreach)
        _momentum_update(grads, bufs, masks, momentum, 0.0, foreach)
        direction, lr = bufs, 1.0
    elif momentum != 0:
        _momentum_update(grads, bufs, masks, momentum, dampening, foreach)
        direction = bufs
    else:
        direction = grads
    _descend(params if reg == "none" else duals, direction, masks, lr, foreach)
    if reg == "none":
        return
    # θ outside S is 0 and v there is unchanged, so prox(δv) is still 0 there: the full
    # prox equals the restricted one and needs no mask.
    if foreach and reg == "l1":
        foreach_l1_prox_(params, duals, lam, delta)
    else:
        for p, v in zip(params, duals):
            prox_(p, v, reg, lam, delta)
    if support_out is not None:
        _write_support(params, support_out)


def _scaled(grads, lr, factor: float, foreach) -> list[torch.Tensor]:
    """factor·τ·g as new tensors (τ a float or, compiled, a 0-d tensor)."""
    if foreach:
        out = torch._foreach_mul(grads, lr)
        torch._foreach_mul_(out, factor)
        return out
    return [g.mul(lr).mul_(factor) for g in grads]


def _descend(target, direction, masks, lr, foreach) -> None:
    """target ← target − τ·direction, on the support only when `masks` are given."""
    if isinstance(lr, torch.Tensor):
        # the compiled path: τ is a 0-d tensor so that a new learning rate every step
        # does not recompile (a float would be baked into the graph)
        direction = torch._foreach_mul(direction, lr)
        lr = 1.0
    if masks is not None:
        # v changes on S only; exactly unchanged outside (v − τ·0)
        if foreach:
            torch._foreach_addcmul_(target, direction, masks, value=-lr)
        else:
            for t, d, m in zip(target, direction, masks):
                t.addcmul_(d, m, value=-lr)
    elif foreach:
        torch._foreach_add_(target, direction, alpha=-lr)
    else:
        for t, d in zip(target, direction):
            t.add_(d, alpha=-lr)


def _write_support(params, support_out) -> None:
    """S = {θ ≠ 0} (NaN counts as non-zero, as in `support`); once per cycle, so a per-tensor
    kernel is cheap, and compiled it fuses into the update."""
    for p, s in zip(params, support_out):
        if torch.compiler.is_compiling():
            s.copy_(p != 0)
        else:
            torch.ne(p, 0, out=s)  # no temporary: a fresh large buffer costs page faults on CPU


def _momentum_update(grads, bufs, masks, momentum, dampening, foreach) -> None:
    """b ← β·b + (1 − d)·g, in place; b = g the first time (torch.optim.SGD semantics).
    With masks, b changes only on the support: b ← b + S·((β − 1)·b + (1 − d)·g)."""
    fresh = [i for i, b in enumerate(bufs) if b is None]
    for i in fresh:
        bufs[i] = torch.clone(grads[i]).detach()
        if masks is not None:
            bufs[i].mul_(masks[i])
    fresh_set = set(fresh)
    old = [i for i in range(len(bufs)) if i not in fresh_set]
    if not old:
        return
    b_old = [bufs[i] for i in old]
    g_old = [grads[i] for i in old]
    if masks is None:
        if foreach:
            torch._foreach_mul_(b_old, momentum)
            torch._foreach_add_(b_old, g_old, alpha=1 - dampening)
        else:
            for b, g in zip(b_old, g_old):
                b.mul_(momentum).add_(g, alpha=1 - dampening)
        return
    m_old = [masks[i] for i in old]
    if foreach:
        delta_b = torch._foreach_mul(b_old, momentum - 1)
        torch._foreach_add_(delta_b, g_old, alpha=1 - dampening)
        torch._foreach_addcmul_(b_old, delta_b, m_old)
    else:
        for b, g, m in zip(b_old, g_old, m_old):
            b.add_((b * (momentum - 1)).add_(g, alpha=1 - dampening).mul_(m))
