"""Per-sample input shapes of the swappable layers, which the timed layer choice runs at: recorded
by a forward pre-hook during dense training steps, or found by one dummy forward."""

from __future__ import annotations

import torch
from torch import nn


def shape_hook(layer):
    """A forward pre-hook recording `layer.in_shape` / `layer.in_grad` (a swap_layer.SwapLayer) in training forwards."""

    def hook(mod, args):
        if args and isinstance(args[0], torch.Tensor) and torch.is_grad_enabled() and mod.training:
            layer.in_shape = tuple(args[0].shape[1:])
            layer.in_grad = bool(args[0].requires_grad)

    return hook


def ensure_shapes(model: nn.Module, layers: list, in_shape: tuple | None) -> None:
    """Input shapes of eligible layers no dense step has shown yet: one dummy forward (eval, no grad)
    of a batch of 2 with per-sample shape `in_shape` (None: nothing to do)."""
    missing = [layer for layer in layers if layer.reason is None and layer.in_shape is None]
    if not missing or in_shape is None:
        return
    seen: dict[int, tuple] = {}

    def recorder(layer):
        def hook(mod, args):
            seen.setdefault(id(layer), (tuple(args[0].shape[1:]), args[0]))

        return hook

    handles = [layer.module.register_forward_pre_hook(recorder(layer)) for layer in missing]
    was_training = model.training
    param = next(model.parameters())
    x = torch.zeros((2,) + in_shape, dtype=param.dtype, device=param.device)
    try:
        model.eval()  # no BN statistics touched
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for layer in missing:
        if id(layer) in seen:
            shape, inp = seen[id(layer)]
            layer.in_shape, layer.in_grad = shape, inp is not x
