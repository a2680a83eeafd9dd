"""The model registry: ``MODELS`` and the ``@register_model(name)`` decorator.

Its own module (not ``mlbreg.models/__init__``) so that the model files can import
it while ``__init__`` imports the model files to fill it: no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from ..registry import Registry

# name -> fn(num_classes, in_shape, **kwargs) -> nn.Module
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str):
    """Decorator: register ``fn(num_classes, in_shape, **kwargs) -> nn.Module`` as `name`."""

    def deco(fn):
        if name in MODELS:
            # Silent overwrites would make the zoo depend on import order.
            raise ValueError(f"model {name!r} registered twice")
        return MODELS.register(name, fn)

    return deco
