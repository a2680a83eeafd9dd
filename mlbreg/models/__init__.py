"""A tiny timm-style model registry.

Models register a builder under a short name; experiments (and the Hydra
configs) refer to architectures only by that name, so adding a model never
touches the training code.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: register ``fn(num_classes, in_shape, **kwargs) -> nn.Module`` as `name`."""

    def deco(fn):
        if name in _REGISTRY:
            # Silent overwrites would make the zoo depend on import order.
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, in_shape, **kwargs) -> nn.Module:
    """Build model `name` for inputs of shape ``in_shape = (C, H, W)``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes, in_shape=tuple(in_shape), **kwargs)


def prunable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d and Linear in ``named_modules()`` order.

    These are the layers whose weights are sparsified/regularized; BN and
    biases stay dense (the usual convention in sparse-training papers).
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# Imported last (after register_model exists) purely for their registration
# side effect; the modules import `register_model` from this package.
from . import resnet, small, vgg, wrn  # noqa: E402,F401

__all__ = ["register_model", "create_model", "list_models", "prunable_modules"]
