"""The torch backend: plain torch layers on any device, nothing swapped (see backends/__init__.py
for the hooks every backend provides)."""

from __future__ import annotations

from torch import nn


class TorchBackend:
    """Plain torch layers: nothing to swap."""

    name = "torch"

    def __init__(self, model: nn.Module):
        self.model = model

    def before_step(self, kind: str) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def after_step(self, kind: str) -> None:
        pass

    def use_dense(self) -> None:
        """Back to dense layers (before evaluation or checkpointing)."""

    def invalidate(self) -> None:
        """The weights changed outside the hooks: nothing to rebuild."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
