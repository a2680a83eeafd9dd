"""LinBreg and ML LinBreg (docs/algorithms.md §1-§3): sparse weights from a sparse start via
linearized Bregman iterations; ML LinBreg adds coarse steps on the support."""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import above, at_least, choice, fail, interval
from ..optim import LinBreg, MLLinBreg
from ..optim.linbreg import MOMENTUM_STYLES
from .base import Method, mask_counts, prunable_weights, split_param_groups


@dataclass(frozen=True)
class LinBregSettings:
    lr: float
    lam: float
    reg: str = "l1"
    delta: float = 1.0
    momentum: float = 0.9
    dampening: float = 0.0
    weight_decay: float = 0.0
    compiled: bool | None = False
    momentum_style: str = "torch"


@dataclass(frozen=True)
class MLLinBregSettings(LinBregSettings):
    m: int = 100
    criterion: str = "fixed"
    kappa: float = 0.45
    eps: float = 1e-3


LINBREG_RULES = (
    ("method.delta", above(0)),
    ("method.weight_decay", at_least(0)),
    ("method.dampening", interval(0, 1)),
    ("method.momentum_style", choice(MOMENTUM_STYLES)),
)


def _optimizer_args(model, s: LinBregSettings) -> dict:
    return dict(
        params=split_param_groups(model, s.reg, s.lam),
        lr=s.lr,
        lam=s.lam,
        reg=s.reg,
        delta=s.delta,
        momentum=s.momentum,
        dampening=s.dampening,
        weight_decay=s.weight_decay,
        compiled=s.compiled,
        momentum_style=s.momentum_style,
    )


class _BregmanMethod(Method):
    """What LinBreg and ML LinBreg share: the momentum convention's check."""

    rules = LINBREG_RULES
    lam_sets_sparsity = True

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.method.get("momentum_style") == "reference" and cfg.method.get("dampening"):
            fail(
                "method.dampening",
                cfg.method.dampening,
                "must be 0 with method.momentum_style=reference (its buffer b ← β·b + (1 − β)·τ·g has no dampening)",
            )


class LinBregMethod(_BregmanMethod):
    """LinBreg: a full weight gradient every step, sparse weights (2·f_S + f_D per step)."""

    name = "linbreg"
    Settings = LinBregSettings
    rules = LINBREG_RULES
    unused_keys = ("m", "sparsity")
    main_keys = ("lam",)

    def __init__(self, model, settings: LinBregSettings):
        super().__init__(LinBreg(**_optimizer_args(model, settings)))

    @classmethod
    def name_parts(cls, cfg) -> list[str]:
        return [f"{cfg.regularizer.name}-lam{cfg.lam:g}", f"{cfg.init.scheme}{cfg.init.density:g}"]

    def step_kind(self) -> str:
        return "full_grad"


class MLLinBregMethod(_BregmanMethod):
    """ML LinBreg: fine step (full gradient) every m steps, coarse steps on the support."""

    name = "mllinbreg"
    Settings = MLLinBregSettings
    rules = LINBREG_RULES + (
        ("method.criterion", choice(MLLinBreg.CRITERIA)),
        ("method.kappa", interval(0, 1, meaning=" (‖Rg‖ >= κ‖g‖ starts a coarse cycle)")),
        ("method.eps", at_least(0)),
    )
    has_coarse_steps = True
    unused_keys = ("sparsity",)
    main_keys = ("lam",)

    def __init__(self, model, settings: MLLinBregSettings):
        s = settings
        super().__init__(MLLinBreg(**_optimizer_args(model, s), m=s.m, criterion=s.criterion, kappa=s.kappa, eps=s.eps))
        self.weights = prunable_weights(model)
        self._support_nnz = None  # |S| per layer, for the current cycle

    @classmethod
    def name_parts(cls, cfg) -> list[str]:
        return [f"{cfg.regularizer.name}-lam{cfg.lam:g}", f"m{cfg.m}", f"{cfg.init.scheme}{cfg.init.density:g}"]

    def step_kind(self) -> str:
        return "full_grad" if self.optimizer.next_step_is_fine() else "sparse"

    def step(self) -> None:
        fine = self.optimizer.next_step_is_fine()
        self.optimizer.step()
        if fine:
            self._support_nnz = None  # a fine step sets a new support

    def structure_nnz(self, kind: str):
        """A coarse step computes on the frozen support S (docs/algorithms.md §6), not on θ ≠ 0."""
        if kind != "sparse":
            return None
        if self._support_nnz is None:
            supports = [self.optimizer.state[w].get("support") for w in self.weights]
            if any(s is None for s in supports):
                return None
            self._support_nnz = mask_counts(supports)
        return self._support_nnz


__all__ = ["LinBregMethod", "MLLinBregMethod", "LinBregSettings", "MLLinBregSettings"]
