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
from .sparsity import RigL, apply_masks_, finetune_split, global_magnitude_masks, load_dense_weights

METHODS = ("mllinbreg", "linbreg", "sgd", "rigl", "prune_finetune")


def prunable_weights(model: nn.Module) -> list[torch.Tensor]:
    return [mod.weight for _, mod in prunable_modules(model)]


def split_param_groups(model: nn.Module, reg: str, lam: float) -> list[dict]:
    """Prunable weights (Conv2d/Linear) get the regularizer; biases and norms are plain SGD."""
    prunable = prunable_weights(model)
    ids = {id(p) for p in prunable}
    others = [p for p in model.parameters() if id(p) not in ids]
    groups = [dict(params=prunable, reg=reg, lam=lam)]
    if others:
        groups.append(dict(params=others, reg="none", lam=0.0))
    return groups


def _sgd(model: nn.Module, lr, momentum, dampening, weight_decay) -> torch.optim.SGD:
    """The torch SGD the dense and fixed-density baselines step with."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, dampening=dampening,
                           weight_decay=weight_decay)


class Method:
    name = "base"
    sparse_init = True             # start from a sparse initialization (algorithms.md §4)
    uses_target_sparsity = False   # init density = 1 - cfg.sparsity (fixed-density methods)
    needs_sparsity = False         # cfg.sparsity is this method's target (it must be set)

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def step_kind(self) -> str:
        raise NotImplementedError

    def step(self) -> None:
        self.optimizer.step()

    def end_epoch(self, epoch: int) -> None:
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
        super().__init__(_sgd(model, lr, momentum, dampening, weight_decay))

    def step_kind(self) -> str:
        return "dense"


class LinBregMethod(Method):
    """LinBreg: a full weight gradient every step, sparse weights (2·f_S + f_D per step)."""
    name = "linbreg"

    def __init__(self, model, *, lr, lam, reg, delta, momentum, dampening, weight_decay=0.0, compiled=False, **_):
        super().__init__(LinBreg(split_param_groups(model, reg, lam), lr=lr, lam=lam, reg=reg, delta=delta,
                                 momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                 compiled=compiled))

    def step_kind(self) -> str:
        return "full_grad"


class MLLinBregMethod(Method):
    """ML LinBreg: fine step (full gradient) every m steps, coarse steps on the support."""
    name = "mllinbreg"

    def __init__(self, model, *, lr, lam, reg, delta, momentum, dampening, m, criterion="fixed",
                 kappa=0.45, eps=1e-3, weight_decay=0.0, compiled=False, **_):
        super().__init__(MLLinBreg(split_param_groups(model, reg, lam), lr=lr, lam=lam, reg=reg, delta=delta,
                                   momentum=momentum, dampening=dampening, weight_decay=weight_decay, m=m,
                                   criterion=criterion, kappa=kappa, eps=eps, compiled=compiled))

    def step_kind(self) -> str:
        return "full_grad" if self.optimizer.next_step_is_fine() else "sparse"


class RigLMethod(Method):
    """RigL (algorithms.md §5): masked SGD at a fixed density, drop/grow every ΔT steps.

    The loop initializes the model at density 1 − `sparsity` with the `init` scheme (the
    RigL paper uses ERK: `init=erk`); the non-zeros of that initialization are the initial
    mask. Ordinary steps: a torch SGD step (momentum, weight decay),
    and weights and momentum are re-masked. Mask-update steps (full dense gradient, no SGD
    step) are those of `mlbreg.sparsity.rigl`. Weight decay defaults to 5e-4, the RigL
    paper's CIFAR-10 value (ImageNet: 1e-4).
    """
    name = "rigl"
    uses_target_sparsity = True
    needs_sparsity = True

    def __init__(self, model, *, lr, momentum, total_steps, weight_decay=5e-4, dampening=0.0, delta_t=100,
                 alpha=0.3, end_fraction=0.75, **_):
        super().__init__(_sgd(model, lr, momentum, dampening, weight_decay))
        self.weights = prunable_weights(model)
        self.rigl = RigL(self.weights, total_steps=total_steps, delta_t=delta_t, alpha=alpha,
                         end_fraction=end_fraction)

    def step_kind(self) -> str:
        return "full_grad" if self.rigl.is_update_step() else "sparse"

    def step(self) -> None:
        if self.rigl.is_update_step():
            self.rigl.update_masks(self.optimizer)   # no SGD step on mask-update steps
        else:
            self.optimizer.step()        # re-masking θ and b after the step makes a gradient mask redundant
            self.rigl.apply_masks(self.optimizer)
        self.rigl.advance()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rigl": self.rigl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rigl.load_state_dict(state["rigl"])


class PruneFinetuneMethod(Method):
    """Dense SGD, one-shot global magnitude pruning to `sparsity`, then fine-tuning with
    the mask fixed (algorithms.md §5).

    The dense phase takes the first `epochs − finetune_epochs` epochs (see
    `mlbreg.sparsity.prune.finetune_split`); the pruning happens in `end_epoch` at that
    boundary. With `from_checkpoint` (a model.pt or a run directory) the saved dense
    weights are loaded at construction and pruned at once, and every epoch fine-tunes.
    Fine-tuning steps, then re-masks weights and momentum.
    """
    name = "prune_finetune"
    sparse_init = False
    needs_sparsity = True

    def __init__(self, model, *, lr, momentum, sparsity, epochs, weight_decay=5e-4, dampening=0.0,
                 finetune_epochs=0.1, from_checkpoint=None, **_):
        super().__init__(_sgd(model, lr, momentum, dampening, weight_decay))
        if sparsity is None or not 0 < sparsity < 1:
            raise ValueError(f"invalid sparsity={sparsity!r}: prune_finetune needs a target sparsity in (0, 1)")
        self.weights = prunable_weights(model)
        self.sparsity = float(sparsity)
        self.dense_epochs, _ = finetune_split(epochs, finetune_epochs, from_checkpoint)
        self.masks: list[torch.Tensor] | None = None
        self.pruned_at_epoch: int | None = None
        if from_checkpoint:
            load_dense_weights(model, from_checkpoint)
            self.prune(epoch=0)

    @property
    def pruned(self) -> bool:
        return self.masks is not None

    def step_kind(self) -> str:
        return "sparse" if self.pruned else "dense"

    def step(self) -> None:
        self.optimizer.step()
        if self.pruned:
            apply_masks_(self.weights, self.masks, self.optimizer)

    @torch.no_grad()
    def prune(self, epoch: int) -> None:
        self.masks = global_magnitude_masks(self.weights, self.sparsity)
        apply_masks_(self.weights, self.masks, self.optimizer)
        self.pruned_at_epoch = epoch

    def end_epoch(self, epoch: int) -> None:
        if not self.pruned and epoch >= self.dense_epochs:
            self.prune(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pruned_at_epoch": self.pruned_at_epoch,
                "masks": None if self.masks is None else [m.clone() for m in self.masks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        masks = state.get("masks")
        self.masks = None if masks is None else [m.to(device=w.device, dtype=torch.bool)
                                                 for m, w in zip(masks, self.weights)]
        self.pruned_at_epoch = state.get("pruned_at_epoch")


_REGISTRY = {"sgd": SGDMethod, "linbreg": LinBregMethod, "mllinbreg": MLLinBregMethod, "rigl": RigLMethod,
             "prune_finetune": PruneFinetuneMethod}


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_method(name: str, model: nn.Module, **settings) -> Method:
    """A method by name; `settings` holds lr, momentum, lam, reg, m, ... (extra keys ignored)."""
    return method_class(name)(model, **settings)
