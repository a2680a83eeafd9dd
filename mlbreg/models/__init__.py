"""A tiny timm-style model registry.

Models register a builder under a short name; experiments (and the Hydra
configs) refer to architectures only by that name, so adding a model never
touches the training code.
"""
from __future__ import annotations

import torch.nn as nn

from . import resnet, small, vgg, wrn
from .registry import MODELS, register_model

# The model files are imported for their side effect: each registers its builders in MODELS.
_MODEL_FILES = (resnet, small, vgg, wrn)


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(MODELS)


def create_model(name: str, num_classes: int, in_shape, **kwargs) -> nn.Module:
    """Build model `name` for inputs of shape ``in_shape = (C, H, W)``."""
    if name not in MODELS:
        # the registry would list the names in registration order; sorted reads better
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    return MODELS.get(name)(num_classes=num_classes, in_shape=tuple(in_shape), **kwargs)


def prunable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d and Linear in ``named_modules()`` order.

    These are the layers whose weights are sparsified/regularized; BN and
    biases stay dense (the usual convention in sparse-training papers).
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


__all__ = ["MODELS", "register_model", "create_model", "list_models", "prunable_modules"]
