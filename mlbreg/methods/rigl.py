"""RigL (docs/algorithms.md §5): masked SGD at a fixed density, drop/grow every ΔT steps; and SET,
the same with random growth.

The drop/grow follows the reference implementation (google-research/rigl) by default:
k = ⌊f·n⌋ (`count`), drop scores |θ| plus N(0, 1e-5²) noise that breaks ties
(`drop_noise_std`, seeded from the run's seed, the step and the layer), and a dropped
weight regrown in the same update keeps its value and momentum (`reinit_when_same`).
`reinit_when_same=true count=round drop_noise_std=0` gives mlbreg's earlier RigL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..checks import at_least, boolean, choice, integer, interval
from ..sparsity import RigL
from ..sparsity.rigl import COUNTS
from .base import Method, prunable_weights, sgd
from .sgd import SGD_RULES


@dataclass(frozen=True)
class RigLSettings:
    lr: float
    total_steps: int
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dampening: float = 0.0
    delta_t: int = 100
    alpha: float = 0.3
    end_fraction: float = 0.75
    reinit_when_same: bool = False
    count: str = "truncate"
    drop_noise_std: float = 1e-5
    seed: int = 0


class RigLMethod(Method):
    """RigL: the loop initializes the model at density 1 − `sparsity` with the `init` scheme
    (the RigL paper uses ERK: `init=erk`); the non-zeros of that initialization are the
    initial mask. Ordinary steps: a torch SGD step (momentum, weight decay), and weights and
    momentum are re-masked. Mask-update steps (full dense gradient, no SGD step) are those
    of `mlbreg.sparsity.rigl`. Weight decay defaults to 5e-4, the RigL paper's CIFAR-10
    value (ImageNet: 1e-4)."""

    name = "rigl"
    Settings = RigLSettings
    rules = SGD_RULES + (
        ("method.delta_t", integer(1, " (steps between mask updates)")),
        ("method.alpha", interval(0, 1, meaning=" (the initial drop fraction)")),
        ("method.end_fraction", interval(0, 1, "(]", " (T_end as a fraction of all steps)")),
        ("method.reinit_when_same", boolean),
        ("method.count", choice(COUNTS)),
        ("method.drop_noise_std", at_least(0, " (stddev of the noise on the drop scores; 0: none)")),
    )
    start = "target"
    needs_sparsity = True
    unused_keys = ("lam", "m", "regularizer.name", "init.density")
    main_keys = ("sparsity",)
    grow = "gradient"  # how the mask machinery grows (mlbreg.sparsity.rigl.GROWS)

    def __init__(self, model, settings: RigLSettings):
        s = settings
        super().__init__(sgd(model, s))
        self.weights = prunable_weights(model)
        self.rigl = RigL(
            self.weights,
            total_steps=s.total_steps,
            delta_t=s.delta_t,
            alpha=s.alpha,
            end_fraction=s.end_fraction,
            reinit_when_same=s.reinit_when_same,
            count=s.count,
            drop_noise_std=s.drop_noise_std,
            seed=s.seed,
            grow=self.grow,
        )
        self._mask_nnz = None

    @classmethod
    def name_parts(cls, cfg) -> list[str]:
        return [f"sp{cfg.sparsity:g}", cfg.init.scheme]

    def step_kind(self) -> str:
        return "full_grad" if self.rigl.is_update_step() else "sparse"

    def structure_nnz(self, kind: str):
        """Ordinary steps compute on the masks; their sizes never change (drop k, grow k)."""
        if kind != "sparse":
            return None
        if self._mask_nnz is None:
            self._mask_nnz = torch.tensor(self.rigl.active, dtype=torch.float64, device=self.weights[0].device)
        return self._mask_nnz

    def step(self) -> None:
        if self.rigl.is_update_step():
            self.rigl.update_masks(self.optimizer)  # no SGD step on mask-update steps
        else:
            self.optimizer.step()  # re-masking θ and b after the step makes a gradient mask redundant
            self.rigl.apply_masks(self.optimizer)
        self.rigl.advance()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rigl": self.rigl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rigl.load_state_dict(state["rigl"])


class SETMethod(RigLMethod):
    """SET (Mocanu et al. 2018, Sparse Evolutionary Training): RigL's schedule, counts, drop
    and settings (ΔT, cosine drop fraction, T_end, `count`, `drop_noise_std`,
    `reinit_when_same`), with the k weights grown uniformly at random among those not
    active after the drop, seeded from (seed, step, layer) (`mlbreg.sparsity.rigl`). As in
    the reference (google-research/rigl, `SparseSETOptimizer`), an update step takes the
    SGD step first and then updates the masks, so no step needs a dense gradient: every
    step is "sparse" (3·f_S)."""

    name = "set"
    grow = "random"

    def step_kind(self) -> str:
        return "sparse"

    def step(self) -> None:
        self.optimizer.step()
        self.rigl.apply_masks(self.optimizer)
        if self.rigl.is_update_step():
            self.rigl.update_masks(self.optimizer)
        self.rigl.advance()
