"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"): the sparsity
rises from 0 (dense) to the target along a cubic schedule while training, the smallest
weights being pruned every Δt steps.

- t counts the optimizer steps already taken. The schedule runs from t₀ = ⌊begin·T⌋ to
  t_end = ⌊end·T⌋ (T: all steps of the run):
  s_t = s_f + (s_i − s_f)·(1 − (t − t₀)/(t_end − t₀))³ with s_i = 0 (a dense start), the
  paper's s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(nΔt))³ with nΔt = t_end − t₀.
- Pruning happens after the step that makes t = t₀ + Δt, t₀ + 2Δt, ... ≤ t_end, and after
  the one that makes t = t_end when t_end − t₀ is not a multiple of Δt, so the last
  pruning is at s_f exactly (the reference, TensorFlow's model_pruning as used by
  google-research/rigl, updates the masks every Δt steps within [begin, end] and reaches
  s_f only when end − begin is a multiple of Δt). At t₀ the schedule is 0: nothing is
  pruned before t₀ + Δt.
- Scope "layer" (the paper's): every layer is pruned to its share of s_t, the per-layer
  densities of `layer_densities(shapes, 1 − s_t, scheme, dense)` (uniform: each layer at
  s_t; ER / ERK: the init scheme's distribution) with exact counts (`exact_counts`, at
  least one weight per layer); per layer the largest |θ| of the active weights are kept.
  Scope "global": one magnitude ranking over all layers, exactly round(s_t·N) zeros
  (`global_magnitude_masks`).
- Pruned weights stay pruned: the masks only shrink (a pruned weight is 0 and ranks below
  every active one). Ties in |θ| go to the lower index.

The masks are applied to the weights and their momentum by the caller after every step
(`mlbreg.methods.GMPMethod`), as in prune + fine-tune.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .masks import apply_masks_, exact_counts, layer_densities
from .prune import global_magnitude_masks

__all__ = ["SCOPES", "GMP", "gmp_sparsity", "layer_magnitude_masks"]

SCOPES = ("layer", "global")


def gmp_sparsity(t: int, target: float, t0: int, t_end: int) -> float:
    """s_t = s_f·(1 − (1 − (t − t₀)/(t_end − t₀))³) on [t₀, t_end]; 0 before, s_f after."""
    if t <= t0:
        return 0.0
    if t >= t_end:
        return float(target)
    return float(target) * (1.0 - (1.0 - (t - t0) / (t_end - t0)) ** 3)


@torch.no_grad()
def layer_magnitude_masks(
    weights: list[torch.Tensor], masks: list[torch.Tensor] | None, counts: list[int]
) -> list[torch.Tensor]:
    """Per layer, a boolean mask keeping the `counts[i]` largest |θ| among the active weights
    (`masks`; None: all active); inactive ones come last, ties go to the lower index."""
    out = []
    for i, (w, keep) in enumerate(zip(weights, counts)):
        score = w.detach().reshape(-1).abs().to(torch.float32)
        if masks is not None:
            score = torch.where(masks[i].reshape(-1), score, torch.full_like(score, -1.0))
        # a stable sort, largest first: equal scores keep their order, so the lower index wins
        order = torch.sort(score, descending=True, stable=True).indices
        mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
        mask[order[:keep]] = True
        out.append(mask.view_as(w))
    return out


class GMP:
    """The masks and schedule of gradual magnitude pruning for a list of weight tensors.

    Args:
        weights: the prunable weights (dense at the start).
        target: s_f, the final sparsity, in (0, 1).
        total_steps: T, all optimizer steps of the run.
        begin, end: t₀ = ⌊begin·T⌋ and t_end = ⌊end·T⌋ (fractions of the run, begin < end).
        frequency: Δt, steps between prunings.
        scope: "layer" (per-layer sparsity from `scheme`) or "global" (one ranking).
        scheme: the layer distribution for scope "layer": uniform, er or erk.
        dense: indices of layers kept dense (scope "layer"; they count towards the budget).
    """

    def __init__(
        self,
        weights: list[torch.Tensor],
        *,
        target: float,
        total_steps: int,
        begin: float = 0.2,
        end: float = 0.75,
        frequency: int = 100,
        scope: str = "layer",
        scheme: str = "uniform",
        dense: tuple[int, ...] = (),
    ):
        if not 0 < target < 1:
            raise ValueError(f"invalid sparsity={target!r}: gmp needs a target sparsity in (0, 1)")
        if not 0 <= begin < end <= 1:
            raise ValueError(f"invalid begin={begin}, end={end}: need 0 <= begin < end <= 1 (fractions of training)")
        if int(frequency) != frequency or frequency < 1:
            raise ValueError(f"invalid frequency={frequency}; must be an integer >= 1 (steps between prunings)")
        if scope not in SCOPES:
            raise ValueError(f"invalid scope={scope!r}; valid: {', '.join(SCOPES)}")
        self.weights = list(weights)
        self.target = float(target)
        self.t0, self.t_end = int(begin * total_steps), int(end * total_steps)
        if self.t_end <= self.t0:
            raise ValueError(
                f"begin={begin} and end={end} of {total_steps} steps leave no step to prune over "
                f"(t0={self.t0}, t_end={self.t_end}); widen them or train longer"
            )
        self.frequency = int(frequency)
        self.scope, self.scheme = scope, scheme
        self.dense = tuple(dense)
        self.shapes = {str(i): tuple(w.shape) for i, w in enumerate(self.weights)}
        self.masks: list[torch.Tensor] | None = None
        self.steps_taken = 0
        self.prunes_done = 0

    def is_prune_step(self, t: int) -> bool:
        """Is t (steps taken) a pruning point: t₀ + kΔt ≤ t_end (k ≥ 1), or t_end itself?"""
        return self.t0 < t <= self.t_end and ((t - self.t0) % self.frequency == 0 or t == self.t_end)

    def prune_steps(self) -> list[int]:
        return [t for t in range(self.t0 + 1, self.t_end + 1) if self.is_prune_step(t)]

    def sparsity(self, t: int | None = None) -> float:
        return gmp_sparsity(self.steps_taken if t is None else t, self.target, self.t0, self.t_end)

    def counts(self, sparsity: float) -> list[int]:
        """Non-zeros per layer at overall `sparsity` (scope "layer")."""
        names = list(self.shapes)
        densities = layer_densities(self.shapes, 1.0 - sparsity, self.scheme, tuple(names[i] for i in self.dense))
        counts = exact_counts({n: math.prod(s) for n, s in self.shapes.items()}, densities)
        return [max(counts[n], 1) for n in names]  # no layer cut off entirely

    @torch.no_grad()
    def prune(self, sparsity: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Masks at overall `sparsity`, applied to the weights and their momentum."""
        if self.scope == "global":
            masks = global_magnitude_masks(self.weights, sparsity)
            if self.masks is not None:  # never revive a pruned weight (a tie at 0)
                masks = [m & old for m, old in zip(masks, self.masks)]
        else:
            masks = layer_magnitude_masks(self.weights, self.masks, self.counts(sparsity))
        self.masks = masks
        apply_masks_(self.weights, self.masks, optimizer)
        self.prunes_done += 1

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """After an optimizer step: re-mask, count the step, prune if it is a pruning point.
        Returns whether the masks changed."""
        if self.masks is not None:
            apply_masks_(self.weights, self.masks, optimizer)
        self.steps_taken += 1
        if not self.is_prune_step(self.steps_taken):
            return False
        self.prune(self.sparsity(), optimizer)
        return True

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return dict(
            masks=None if self.masks is None else [m.clone() for m in self.masks],
            steps_taken=self.steps_taken,
            prunes_done=self.prunes_done,
            t0=self.t0,
            t_end=self.t_end,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state["masks"]
        if masks is not None:
            if len(masks) != len(self.weights) or any(m.shape != w.shape for m, w in zip(masks, self.weights)):
                raise ValueError("the GMP masks of the checkpoint do not fit this model's prunable weights")
            masks = [m.to(device=w.device, dtype=torch.bool) for m, w in zip(masks, self.weights)]
        self.masks = masks
        self.steps_taken, self.prunes_done = int(state["steps_taken"]), int(state["prunes_done"])
        if (int(state["t0"]), int(state["t_end"])) != (self.t0, self.t_end):
            raise ValueError(
                f"the checkpoint's GMP schedule (t0={state['t0']}, t_end={state['t_end']}) is not this "
                f"run's (t0={self.t0}, t_end={self.t_end})"
            )
