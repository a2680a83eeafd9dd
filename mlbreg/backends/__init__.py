"""Compute backends for the layers: torch (any device), or sparse CPU layers for ML LinBreg's coarse
steps: the project's own kernels (native, see backends/native) or SparseProp.

The training loop calls, around every step:
    backend.before_step(kind)   # kind from method.step_kind(): "dense" | "full_grad" | "sparse"
    ... forward, backward ...
    backend.after_backward()    # sparse layers: their value gradients -> the dense weight.grad
    method.step()
    backend.after_step(kind)    # the updated dense weights -> the sparse layers' values
The dense `weight` parameters stay the single source of truth (the optimizer, checkpoints
and metrics only ever see them), so results do not depend on the backend.

A backend also has a `name`. `make_backend(..., batch_size=, in_shape=, optimizer=)`: the
SparseProp backend times layers at the training batch size, can run a dummy forward with `in_shape`, and reads the
support S from ML LinBreg's `optimizer.state[w]["support"]` (exact for every regularizer, and
after resuming inside a cycle; without it the structure is `w != 0`, which is S for `l1` at a
cycle start). Other options reach `SparsePropBackend` unchanged (see backends/sparseprop.py).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

BACKENDS = ("auto", "torch", "native", "sparseprop")


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

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def sparseprop_available() -> bool:
    try:
        import sparseprop  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken build is as unavailable as a missing one
        return False
    return True


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def make_backend(name: str, model: nn.Module, device: torch.device, method_name: str, **options):
    """`auto`: on CPU for ML LinBreg (not distributed) the native kernels when they build and pass their
    self-check, else SparseProp when installed, else torch layers; anything else gets torch layers."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "torch":
        return TorchBackend(model)
    wants_sparse = device.type == "cpu" and method_name == "mllinbreg" and not _distributed()
    if name == "auto" and not wants_sparse:
        return TorchBackend(model)
    if _distributed():
        # a swapped layer's dense weight gets its gradient after backward, outside autograd:
        # DDP's reducer would never see it (unsynchronized gradients or a hang)
        raise ValueError(f"backend={name} does not work with distributed (DDP) training; use backend=torch")
    if device.type != "cpu":
        raise ValueError(f"backend={name} runs on the CPU only, not on device {device}; use backend=torch")
    if name in ("auto", "native"):
        from .native import build
        try:
            build.load()
        except build.NativeUnavailable as err:
            if name == "native":
                raise RuntimeError(f"backend=native: {err}; or use backend=auto / torch") from err
            fallback = "SparseProp" if sparseprop_available() else "torch layers"
            # one line on stderr, not a Python warning with its source line: this is the newcomer's first run
            print(f"mlbreg: note: native kernels unavailable ({err}); backend=auto uses {fallback}", file=sys.stderr)
        else:
            from .native.backend import NativeBackend
            return NativeBackend(model, **options)
    if not sparseprop_available():
        if name == "sparseprop":
            raise RuntimeError("backend=sparseprop needs the SparseProp package: pip install pybind11 scipy && "
                               "pip install --no-build-isolation 'sparseprop>=0.1.14' (see README); "
                               "or use backend=torch")
        return TorchBackend(model)
    from .sparseprop import SparsePropBackend
    return SparsePropBackend(model, **options)
