"""Gradual magnitude pruning (Zhu & Gupta 2017): dense SGD while the sparsity rises along a
cubic schedule to the target, pruning every Δt steps (`mlbreg.sparsity.gmp`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..checks import choice, fail, integer, interval
from ..sparsity import GMP, SCOPES
from .base import Method, mask_counts, prunable_weights, sgd
from .sgd import SGD_RULES


@dataclass(frozen=True)
class GMPSettings:
    lr: float
    sparsity: float
    total_steps: int
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dampening: float = 0.0
    begin: float = 0.2
    end: float = 0.75
    frequency: int = 100
    scope: str = "layer"
    init_scheme: str = "uniform"
    dense_first: bool = False
    dense_last: bool = False


class GMPMethod(Method):
    """GMP: from dense Kaiming weights, torch SGD steps; after the step that completes t steps,
    at each pruning point of the schedule (t₀ = ⌊begin·T⌋ < t ≤ t_end = ⌊end·T⌋, every
    `frequency` steps and at t_end) the weights are pruned by magnitude to the schedule's
    sparsity s_t (scope "layer": per layer, the `init` scheme's distribution and
    `init.dense_first/last`; "global": one ranking), and from then on weights and momentum
    are re-masked after every step, as in prune + fine-tune. The last pruning, at t_end, is
    at the target exactly. Steps before the first pruning are dense (3·f_D); the others
    compute on the masks of that step (3·f_S(t))."""

    name = "gmp"
    Settings = GMPSettings
    rules = SGD_RULES + (
        ("method.begin", interval(0, 1, "[)", " (t0 = begin·T: the schedule starts; a fraction of all steps)")),
        ("method.end", interval(0, 1, "(]", " (t_end = end·T: the target is reached; a fraction of all steps)")),
        ("method.frequency", integer(1, " (Δt: steps between prunings)")),
        ("method.scope", choice(SCOPES)),
    )
    start = "dense"
    needs_sparsity = True
    unused_keys = ("lam", "m", "regularizer.name", "init.density", "init.scale")
    main_keys = ("sparsity",)

    def __init__(self, model, settings: GMPSettings):
        s = settings
        super().__init__(sgd(model, s))
        self.weights = prunable_weights(model)
        last = len(self.weights) - 1
        dense = tuple(([0] if s.dense_first else []) + ([last] if s.dense_last and last > 0 else []))
        self.gmp = GMP(
            self.weights,
            target=s.sparsity,
            total_steps=s.total_steps,
            begin=s.begin,
            end=s.end,
            frequency=s.frequency,
            scope=s.scope,
            scheme=s.init_scheme,
            dense=dense,
        )
        self._mask_nnz = None

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        m = cfg.method
        if m.begin >= m.end:
            fail("method.begin", m.begin, f"must be < method.end={m.end} (the schedule runs from begin·T to end·T)")
        if m.scope == "global" and (cfg.init.dense_first or cfg.init.dense_last):
            fail(
                "method.scope",
                "global",
                "ranks all layers together, so init.dense_first / init.dense_last "
                "cannot keep a layer dense; use method.scope=layer or set both to false",
            )

    @classmethod
    def name_parts(cls, cfg) -> list[str]:
        return [f"sp{cfg.sparsity:g}", cfg.init.scheme if cfg.method.scope == "layer" else "global"]

    def step_kind(self) -> str:
        return "dense" if self.gmp.masks is None else "sparse"

    def structure_nnz(self, kind: str):
        """Steps after the first pruning compute on that step's masks."""
        if kind != "sparse" or self.gmp.masks is None:
            return None
        if self._mask_nnz is None:
            self._mask_nnz = mask_counts(self.gmp.masks)
        return self._mask_nnz

    def step(self) -> None:
        self.optimizer.step()
        if self.gmp.after_step(self.optimizer):
            self._mask_nnz = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "gmp": self.gmp.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.gmp.load_state_dict(state["gmp"])
        self._mask_nnz = None
