"""Static sparse training: the init mask, never updated (the fixed-mask baseline of RigL's paper)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..sparsity import apply_masks_
from .base import Method, mask_counts, prunable_weights, sgd
from .sgd import SGD_RULES


@dataclass(frozen=True)
class StaticSettings:
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dampening: float = 0.0


class StaticMethod(Method):
    """Static sparse training: the loop initializes the model at density 1 − `sparsity` with
    the `init` scheme (uniform / ER / ERK), as for RigL; the non-zeros of that
    initialization are the mask for the whole run. Every step is a torch SGD step
    (momentum, weight decay 5e-4 as RigL's CIFAR-10 setup), after which weights and
    momentum are re-masked; every step computes on the mask (3·f_S)."""

    name = "static"
    Settings = StaticSettings
    rules = SGD_RULES
    start = "target"
    needs_sparsity = True
    unused_keys = ("lam", "m", "regularizer.name", "init.density")
    main_keys = ("sparsity",)

    def __init__(self, model, settings: StaticSettings):
        super().__init__(sgd(model, settings))
        self.weights = prunable_weights(model)
        with torch.no_grad():
            self.masks = [w.detach() != 0 for w in self.weights]
        self._mask_nnz = None

    @classmethod
    def name_parts(cls, cfg) -> list[str]:
        return [f"sp{cfg.sparsity:g}", cfg.init.scheme]

    def step_kind(self) -> str:
        return "sparse"

    def structure_nnz(self, kind: str):
        """Every step computes on the fixed mask."""
        if self._mask_nnz is None:
            self._mask_nnz = mask_counts(self.masks)
        return self._mask_nnz

    def step(self) -> None:
        self.optimizer.step()
        apply_masks_(self.weights, self.masks, self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "masks": [m.clone() for m in self.masks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.masks = [m.to(device=w.device, dtype=torch.bool) for m, w in zip(state["masks"], self.weights)]
        self._mask_nnz = None
