"""Training methods: what the loop needs to know about ML LinBreg, LinBreg, SGD, ...

A method owns its optimizer and any extra state (masks, schedules). The loop only asks
`step_kind()` before a step ("dense": a dense SGD step, "full_grad": a full weight
gradient with sparse forward, "sparse": everything on the support; this picks the FLOPs
model of algorithms.md §6 and tells a sparse backend whether dense layers are needed),
calls `step()` after backward, and `end_epoch()` after each epoch.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .models import prunable_modules
from .optim import LinBreg, MLLinBreg

METHODS = ("mllinbreg", "linbreg", "sgd")


def split_param_groups(model: nn.Module, reg: str, lam: float) -> list[dict]:
    """Prunable weights (Conv2d/Linear) get the regularizer; biases and norms are plain SGD."""
    prunable = [mod.weight for _, mod in prunable_modules(model)]
    ids = {id(p) for p in prunable}
    others = [p for p in model.parameters() if id(p) not in ids]
    groups = [dict(params=prunable, reg=reg, lam=lam)]
    if others:
        groups.append(dict(params=others, reg="none", lam=0.0))
    return groups


class Method:
    name = "base"
    sparse_init = True             # start from a sparse initialization (algorithms.md §4)
    uses_target_sparsity = False   # init density = 1 - cfg.sparsity (fixed-density methods)

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def step_kind(self) -> str:
        raise NotImplementedError

    def step(self) -> None:
        self.optimizer.step()

    def end_epoch(self, epoch: int, model: nn.Module) -> None:
        """Called after every epoch (prune_finetune prunes here)."""

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class SGDMethod(Method):
    """Dense SGD baseline (momentum, weight decay; the CIFAR recipe)."""
    name = "sgd"
    sparse_init = False

    def __init__(self, model, *, lr, momentum, weight_decay, dampening=0.0, **_):
        super().__init__(torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, dampening=dampening,
                                         weight_decay=weight_decay))

    def step_kind(self) -> str:
        return "dense"


class LinBregMethod(Method):
    """LinBreg: a full weight gradient every step, sparse weights (2·f_S + f_D per step)."""
    name = "linbreg"

    def __init__(self, model, *, lr, lam, reg, delta, momentum, dampening, weight_decay=0.0, **_):
        super().__init__(LinBreg(split_param_groups(model, reg, lam), lr=lr, lam=lam, reg=reg, delta=delta,
                                 momentum=momentum, dampening=dampening, weight_decay=weight_decay))

    def step_kind(self) -> str:
        return "full_grad"


class MLLinBregMethod(Method):
    """ML LinBreg: fine step (full gradient) every m steps, coarse steps on the support."""
    name = "mllinbreg"

    def __init__(self, model, *, lr, lam, reg, delta, momentum, dampening, m, criterion="fixed",
                 kappa=0.45, eps=1e-3, weight_decay=0.0, **_):
        super().__init__(MLLinBreg(split_param_groups(model, reg, lam), lr=lr, lam=lam, reg=reg, delta=delta,
                                   momentum=momentum, dampening=dampening, weight_decay=weight_decay, m=m,
                                   criterion=criterion, kappa=kappa, eps=eps))

    def step_kind(self) -> str:
        return "full_grad" if self.optimizer.next_step_is_fine() else "sparse"


_REGISTRY = {"sgd": SGDMethod, "linbreg": LinBregMethod, "mllinbreg": MLLinBregMethod}


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_method(name: str, model: nn.Module, **settings) -> Method:
    """A method by name; `settings` holds lr, momentum, lam, reg, m, ... (extra keys ignored)."""
    return method_class(name)(model, **settings)
