"""Training methods: ML LinBreg, LinBreg, and the baselines SGD, RigL, SET, static sparse,
gradual magnitude pruning (GMP), prune + fine-tune.

One class per method (mlbreg/methods/<family>.py), registered in `METHODS`; each owns its
settings, rules and run-name parts (see `base.Method`). The rest of mlbreg asks the class:
`method_class(cfg.method.name).init_density(cfg)`, `.name_parts(cfg)`, `.check(cfg)`, ...
"""

from __future__ import annotations

from torch import nn

from ..registry import Registry
from .base import Method, prunable_weights, split_param_groups
from .bregman import LinBregMethod, MLLinBregMethod
from .gmp import GMPMethod
from .prune import PruneFinetuneMethod
from .rigl import RigLMethod, SETMethod
from .sgd import SGDMethod
from .static import StaticMethod

METHODS: Registry[type[Method]] = Registry("method")
for _cls in (MLLinBregMethod, LinBregMethod, SGDMethod, RigLMethod, PruneFinetuneMethod, SETMethod, StaticMethod, GMPMethod):
    METHODS.register(_cls.name, _cls)


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def build_method(name: str, model: nn.Module, **settings) -> Method:
    """A method by name with its settings as keywords (lr, momentum, lam, reg, m, ...; see the
    method's `Settings`); an unknown setting raises ValueError naming the valid ones."""
    cls = method_class(name)
    return cls(model, cls.make_settings(settings))


def method_from_config(cfg, model: nn.Module, steps_per_epoch: int) -> Method:
    """The run's method: its settings taken from the config (`Method.settings_from`)."""
    cls = method_class(cfg.method.name)
    return cls(model, cls.settings_from(cfg, steps_per_epoch))


__all__ = [
    "METHODS",
    "Method",
    "method_class",
    "build_method",
    "method_from_config",
    "prunable_weights",
    "split_param_groups",
    "SGDMethod",
    "LinBregMethod",
    "MLLinBregMethod",
    "RigLMethod",
    "PruneFinetuneMethod",
    "SETMethod",
    "StaticMethod",
    "GMPMethod",
]
