"""RigL (Evci et al. 2020, "Rigging the Lottery"): sparse training at a fixed density.

The mask schedule of docs/algorithms.md §5, independent of the optimizer that takes the SGD
steps (`mlbreg.methods.RigLMethod` pairs it with torch.optim.SGD). By default it follows
the reference implementation (google-research/rigl, `SparseRigLOptimizer` and
`_get_update_op` in rigl/sparse_optimizers.py):

- t counts the optimizer steps already taken (0, 1, 2, ...). Step t is a *mask-update
  step* when t > 0, t mod ΔT = 0 and t < T_end, with T_end = ⌊end_fraction·T⌋ (T: all
  steps of the run). So the first ΔT steps are plain SGD on the initial mask, and from
  T_end on the mask is fixed.
- drop_fraction(t) = (α/2)·(1 + cos(π·t/T_end)) (cosine decay from α to 0).
- On an update step, per sparse layer with n active weights: k = ⌊drop_fraction·n⌋
  (`count="truncate"`, the reference's `int(n_ones * drop_fraction)`; `count="round"`:
  round(drop_fraction·n)); drop the k active weights of smallest |θ| + ε, ε ~ N(0, σ²)
  with σ = `drop_noise_std` (1e-5, the reference's `noise_std`: it breaks ties at random;
  0: no noise, ties go to the lower index), then grow the k weights of largest |g| (g:
  the dense gradient of the masked weights, p.grad with the torch backend) among those
  not active after the drop. A weight just dropped may be grown again.
- Only connections that were not active before the update are new: they start at exactly
  0 with zero momentum. A dropped and regrown weight keeps its value and its momentum
  (`reinit_when_same=False`, the reference default); with `reinit_when_same=True` it is
  reset like a new one. Dropped weights become 0 with zero momentum.
- The SGD step is skipped on update steps (the caller does that).
- Layers that are dense at the start (density 1, e.g. `init.dense_first`) are never
  updated: dropping and regrowing there would only zero their smallest weights.

The noise is drawn on the CPU from a torch.Generator seeded from (seed, t, layer index),
then moved to the weight's device: it is the same on every device and after a resume,
with no state beyond the step count. `reinit_when_same=True, count="round",
drop_noise_std=0` is mlbreg's RigL before these options existed.

SET (Mocanu et al. 2018; `grow="random"`, the reference's `SparseSETOptimizer`) uses the
same schedule, counts, drop and noise; it grows k weights drawn uniformly at random among
those not active after the drop (a just-dropped weight may be drawn again), with no
gradient. The draw is a `torch.randperm` on the CPU from a generator seeded from (seed,
t, layer index) and a stream of its own, over the candidates in index order: a uniformly
random k-subset, the same on every device, rank and after a resume. The reference draws
uniform scores and takes the k largest: the same distribution. Unlike RigL, SET's update
steps also take the SGD step, before the drop (the reference applies the optimizer's
update, then the mask update); its caller (`mlbreg.methods.SETMethod`) does that.

Everything is one topk per layer and a few whole-tensor ops; no per-element Python.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .masks import apply_masks_, momentum_buffers

__all__ = ["COUNTS", "GROWS", "RigL", "drop_and_grow", "drop_and_grow_random", "drop_fraction", "drop_noise", "grow_generator"]


def drop_fraction(t: int, alpha: float, t_end: int) -> float:
    """(α/2)·(1 + cos(π·t/T_end)) for t < T_end, 0 from T_end on."""
    if t_end <= 0 or t >= t_end:
        return 0.0
    return alpha / 2 * (1 + math.cos(math.pi * t / t_end))


COUNTS = ("truncate", "round")
GROWS = ("gradient", "random")  # RigL: the largest |g|; SET: uniformly at random
_GROW_STREAM = 0x5E7_5EED_0000_0001  # keeps SET's grow draws apart from the drop noise of the same (seed, t, layer)


def _layer_seed(seed: int, t: int, layer: int) -> int:
    return (int(seed) * 1_000_003 + int(t) * 1009 + int(layer)) % 2**63


def drop_noise(shape: torch.Size, std: float, seed: int, t: int, layer: int) -> torch.Tensor:
    """N(0, std²) noise for the drop scores of layer `layer` at step t: float32 on the CPU
    from a generator seeded from (seed, t, layer), so it is the same on every device and
    after a resume."""
    g = torch.Generator().manual_seed(_layer_seed(seed, t, layer))
    return torch.randn(shape, generator=g, dtype=torch.float32).mul_(std)


def _extreme(score: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Boolean mask of the k smallest (largest) entries of the flat `score`, exact ties
    going to the lower index (torch.topk alone does not promise that): one topk for the
    k-th value, then whole-tensor compares and a cumsum, no host sync."""
    values = torch.topk(score, k, largest=largest, sorted=False).values
    kth = values.min() if largest else values.max()
    beyond = score > kth if largest else score < kth
    tied = score == kth
    return beyond | (tied & (tied.cumsum(0) <= k - beyond.sum()))


def _drop(weight: torch.Tensor, mask: torch.Tensor, k: int, noise: torch.Tensor | None) -> torch.Tensor:
    """The flat mask after dropping the k active weights of smallest |θ| (+ `noise`)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)  # noise of 1e-5 must not vanish in half precision
    score = weight.reshape(-1).abs().to(dtype)
    if noise is not None:
        score = score + noise.reshape(-1).to(device=weight.device, dtype=dtype)
    flat_mask = mask.reshape(-1)
    drop_score = torch.where(flat_mask, score, torch.tensor(float("inf"), dtype=dtype, device=weight.device))
    return flat_mask & ~_extreme(drop_score, k, largest=False)  # inactive weights are never "dropped"


@torch.no_grad()
def drop_and_grow(
    weight: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, k: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """New mask after dropping the k smallest-score active weights (score |θ|, plus `noise`
    where given) and growing the k largest-|g| weights among the inactive ones (after the
    drop).

    Returns (new_mask, kept): `kept` is the mask after the drop, so θ ⊙ kept zeroes the
    dropped weights (and, with reinit_when_same, the regrown ones too). Exact ties go to
    the lower index, in the drop and in the grow."""
    if k <= 0:
        return mask.clone(), mask.clone()
    kept = _drop(weight, mask, k, noise)
    dtype = torch.promote_types(weight.dtype, torch.float32)
    inf = torch.tensor(float("inf"), dtype=dtype, device=weight.device)
    grow_score = torch.where(kept, -inf, grad.reshape(-1).abs().to(dtype))
    new_mask = kept | _extreme(grow_score, k, largest=True)
    return new_mask.view_as(mask), kept.view_as(mask)


@torch.no_grad()
def drop_and_grow_random(
    weight: torch.Tensor, mask: torch.Tensor, k: int, generator: torch.Generator, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SET's update: drop as `drop_and_grow`, then grow k weights drawn uniformly at random
    (a `randperm` of the CPU `generator`) among those not active after the drop, taken in
    index order, so the draw does not depend on the device. Returns (new_mask, kept)."""
    if k <= 0:
        return mask.clone(), mask.clone()
    kept = _drop(weight, mask, k, noise)
    candidates = torch.nonzero(~kept).flatten()
    chosen = torch.randperm(candidates.numel(), generator=generator)[:k].to(candidates.device)
    new_mask = kept.clone()
    new_mask[candidates[chosen]] = True
    return new_mask.view_as(mask), kept.view_as(mask)


def grow_generator(seed: int, t: int, layer: int) -> torch.Generator:
    """The CPU generator of SET's grow draw in layer `layer` at step t (its own stream)."""
    return torch.Generator().manual_seed((_layer_seed(seed, t, layer) + _GROW_STREAM) % 2**63)


class RigL:
    """RigL's masks and schedule for a list of weight tensors.

    Args:
        weights: the prunable weights (their current zeros define the initial masks
            unless `masks` is given).
        total_steps: T, all optimizer steps of the run.
        delta_t: ΔT, steps between mask updates.
        alpha: initial drop fraction α.
        end_fraction: mask updates stop at T_end = ⌊end_fraction·T⌋.
        masks: optional initial boolean masks (default: weight != 0).
        reinit_when_same: a dropped weight that is regrown in the same update restarts
            at 0 with zero momentum (default False, the reference's: it keeps both).
        count: k per layer, "truncate" (⌊f·n⌋, the reference's) or "round" (round(f·n)).
        drop_noise_std: stddev of the Gaussian noise added to the active weights' drop
            scores |θ| (default 1e-5, the reference's `noise_std`; 0: ties to the lower index).
        seed: seeds the noise, with the step and the layer index (the run's seed).
        grow: "gradient" (RigL: the largest |g|) or "random" (SET: uniformly at random,
            seeded from the seed, the step and the layer; no gradient needed).

    `reinit_when_same=True, count="round", drop_noise_std=0` is mlbreg's earlier RigL.
    These options are constructor arguments, not checkpoint state.
    """

    def __init__(
        self,
        weights: list[torch.Tensor],
        *,
        total_steps: int,
        delta_t: int = 100,
        alpha: float = 0.3,
        end_fraction: float = 0.75,
        masks: list[torch.Tensor] | None = None,
        reinit_when_same: bool = False,
        count: str = "truncate",
        drop_noise_std: float = 1e-5,
        seed: int = 0,
        grow: str = "gradient",
    ):
        if int(delta_t) != delta_t or delta_t < 1:
            raise ValueError(f"invalid delta_t={delta_t}; must be an integer >= 1")
        if not 0 <= alpha <= 1:
            raise ValueError(f"invalid alpha={alpha}; the drop fraction must be in [0, 1]")
        if not 0 < end_fraction <= 1:
            raise ValueError(f"invalid end_fraction={end_fraction}; must be in (0, 1]")
        if total_steps < 1:
            raise ValueError(f"invalid total_steps={total_steps}; must be >= 1")
        if count not in COUNTS:
            raise ValueError(f"invalid count={count!r}; valid: {', '.join(COUNTS)}")
        if not (math.isfinite(drop_noise_std) and drop_noise_std >= 0):
            raise ValueError(f"invalid drop_noise_std={drop_noise_std}; must be >= 0")
        if grow not in GROWS:
            raise ValueError(f"invalid grow={grow!r}; valid: {', '.join(GROWS)}")
        self.weights = list(weights)
        with torch.no_grad():
            self.masks = (
                [m.to(torch.bool).clone() for m in masks] if masks is not None else [w.detach() != 0 for w in self.weights]
            )
        self._count_active()
        self.delta_t = int(delta_t)
        self.alpha = float(alpha)
        self.t_end = int(end_fraction * total_steps)
        self.reinit_when_same = bool(reinit_when_same)
        self.count = count
        self.drop_noise_std = float(drop_noise_std)
        self.seed = int(seed)
        self.grow = grow
        self.steps_taken = 0
        self.updates_done = 0

    def _count_active(self) -> None:
        # host-side counts (drop and grow keeps them): no device sync to size the topk on update steps
        self.active = [int(m.sum()) for m in self.masks]
        self.updatable = [0 < n < m.numel() for n, m in zip(self.active, self.masks)]

    def is_update_step(self, t: int | None = None) -> bool:
        t = self.steps_taken if t is None else t
        return t > 0 and t % self.delta_t == 0 and t < self.t_end

    def drop_fraction(self, t: int | None = None) -> float:
        return drop_fraction(self.steps_taken if t is None else t, self.alpha, self.t_end)

    def drop_counts(self, t: int | None = None) -> list[int]:
        """k per layer at step t (0 for dense layers)."""
        f = self.drop_fraction(t)
        size = int if self.count == "truncate" else round
        return [size(f * n) if ok else 0 for n, ok in zip(self.active, self.updatable)]

    @torch.no_grad()
    def update_masks(self, optimizer: torch.optim.Optimizer | None = None) -> list[int]:
        """Drop and grow in every sparse layer (grow="gradient" uses each weight's .grad). New
        connections and dropped weights, with their momentum, become 0; a dropped and regrown
        weight keeps its value and momentum unless `reinit_when_same`. Returns k per layer."""
        counts = self.drop_counts()
        buffers = momentum_buffers(optimizer, self.weights) if optimizer is not None else [None] * len(self.weights)
        for i, (w, k) in enumerate(zip(self.weights, counts)):
            if k == 0 or (self.grow == "gradient" and w.grad is None):
                continue
            old = self.masks[i]
            noise = (
                drop_noise(w.shape, self.drop_noise_std, self.seed, self.steps_taken, i) if self.drop_noise_std > 0 else None
            )
            if self.grow == "gradient":
                new_mask, kept = drop_and_grow(w, w.grad, old, k, noise)
            else:
                new_mask, kept = drop_and_grow_random(w, old, k, grow_generator(self.seed, self.steps_taken, i), noise)
            keep = kept if self.reinit_when_same else new_mask & old  # what keeps its value and momentum
            w.mul_(keep)
            if buffers[i] is not None:
                buffers[i].mul_(keep)
            self.masks[i] = new_mask
        self.updates_done += 1
        return counts

    @torch.no_grad()
    def apply_masks(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        apply_masks_(self.weights, self.masks, optimizer)

    def advance(self) -> None:
        self.steps_taken += 1

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return dict(
            masks=[m.clone() for m in self.masks],
            steps_taken=self.steps_taken,
            updates_done=self.updates_done,
            delta_t=self.delta_t,
            alpha=self.alpha,
            t_end=self.t_end,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["masks"]) != len(self.masks):
            raise ValueError(f"RigL state has {len(state['masks'])} masks, this model {len(self.masks)}")
        for mine, theirs in zip(self.masks, state["masks"]):
            if mine.shape != theirs.shape:
                raise ValueError(f"RigL mask of shape {tuple(theirs.shape)} does not fit a weight of shape {tuple(mine.shape)}")
        self.masks = [m.to(device=w.device, dtype=torch.bool) for m, w in zip(state["masks"], self.weights)]
        self._count_active()
        self.steps_taken = int(state["steps_taken"])
        self.updates_done = int(state.get("updates_done", 0))
        self.delta_t, self.alpha, self.t_end = int(state["delta_t"]), float(state["alpha"]), int(state["t_end"])
