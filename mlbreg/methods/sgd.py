"""Dense SGD: the baseline every sparse method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import at_least, interval
from .base import INIT_KEYS, Method, sgd


@dataclass(frozen=True)
class SGDSettings:
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dampening: float = 0.0


SGD_RULES = (("method.weight_decay", at_least(0)), ("method.dampening", interval(0, 1)))


class SGDMethod(Method):
    """Dense SGD baseline (momentum, weight decay; the CIFAR recipe), from dense Kaiming weights."""

    name = "sgd"
    Settings = SGDSettings
    rules = SGD_RULES
    start = "dense"
    unused_keys = ("lam", "m", "regularizer.name", "sparsity", *INIT_KEYS)

    def __init__(self, model, settings: SGDSettings):
        super().__init__(sgd(model, settings))

    def step_kind(self) -> str:
        return "dense"
