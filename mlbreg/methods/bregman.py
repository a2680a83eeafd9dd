"""LinBreg and ML LinBreg (algorithms.md §1-§3): sparse weights from a sparse start via
linearized Bregman iterations; ML LinBreg adds coarse steps on the support."""
from __future__ import annotations

from dataclasses import dataclass

from ..checks import above, at_least, choice, interval
from ..optim import LinBreg, MLLinBreg
from .base import Method, split_param_groups


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


@dataclass(frozen=True)
class MLLinBregSettings(LinBregSettings):
    m: int = 100
    criterion: str = "fixed"
    kappa: float = 0.45
    eps: float = 1e-3


LINBREG_RULES = (("method.delta", above(0)), ("method.weight_decay", at_least(0)),
                 ("method.dampening", interval(0, 1)))


def _optimizer_args(model, s: LinBregSettings) -> dict:
    return dict(params=split_param_groups(model, s.reg, s.lam), lr=s.lr, lam=s.lam, reg=s.reg, delta=s.delta,
                momentum=s.momentum, dampening=s.dampening, weight_decay=s.weight_decay, compiled=s.compiled)


class LinBregMethod(Method):
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


class MLLinBregMethod(Method):
    """ML LinBreg: fine step (full gradient) every m steps, coarse steps on the support."""
    name = "mllinbreg"
    Settings = MLLinBregSettings
    rules = LINBREG_RULES + (
        ("method.criterion", choice(MLLinBreg.CRITERIA)),
        ("method.kappa", interval(0, 1, meaning=" (‖Rg‖ >= κ‖g‖ starts a coarse cycle)")),
        ("method.eps", at_least(0)))
    has_coarse_steps = True
    unused_keys = ("sparsity",)
    main_keys = ("lam",)

    def __init__(self, model, settings: MLLinBregSettings):
        s = settings
        super().__init__(MLLinBreg(**_optimizer_args(model, s), m=s.m, criterion=s.criterion, kappa=s.kappa,
                                   eps=s.eps))

    @classmethod
    def name_parts(cls, cfg) -> list[str]:
        return [f"{cfg.regularizer.name}-lam{cfg.lam:g}", f"m{cfg.m}", f"{cfg.init.scheme}{cfg.init.density:g}"]

    def step_kind(self) -> str:
        return "full_grad" if self.optimizer.next_step_is_fine() else "sparse"


__all__ = ["LinBregMethod", "MLLinBregMethod", "LinBregSettings", "MLLinBregSettings"]
