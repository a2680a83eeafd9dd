"""A tiny timm-style model registry.

Models register a builder under a short name; experiments (and the Hydra
configs) refer to architectures only by that name, so adding a model never
touches the training code.
"""

from __future__ import annotations

import difflib

import torch.nn as nn

from ..checks import ConfigError
from . import resnet, small, vgg, wrn
from .external import HOW_TO_LIST, check_name, create_external, is_external
from .registry import MODELS, register_model

# The model files are imported for their side effect: each registers its builders in MODELS.
_MODEL_FILES = (resnet, small, vgg, wrn)


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(MODELS)


def check_model_name(name) -> None:
    """ConfigError (a ValueError) unless `name` is a registered model, ``torchvision.X`` or ``timm.X``."""
    if is_external(name):
        check_name(name)
    elif name not in MODELS:
        # the registry would list the names in registration order; sorted reads better
        close = difflib.get_close_matches(str(name), list_models(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"invalid model.name={name!r}{hint}; valid: {', '.join(list_models())}, or {HOW_TO_LIST}")


def create_model(name: str, num_classes: int, in_shape, **kwargs) -> nn.Module:
    """Build model `name` (registered, or ``torchvision.X`` / ``timm.X``: models/external.py) for inputs of shape
    ``in_shape = (C, H, W)``."""
    check_model_name(name)
    if is_external(name):
        return create_external(name, num_classes, tuple(in_shape), **kwargs)
    return MODELS.get(name)(num_classes=num_classes, in_shape=tuple(in_shape), **kwargs)


def prunable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d and Linear in ``named_modules()`` order.

    These are the layers whose weights are sparsified/regularized; BN and
    biases stay dense (the usual convention in sparse-training papers).
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


__all__ = ["MODELS", "register_model", "create_model", "check_model_name", "is_external", "list_models", "prunable_modules"]
