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

Modules: dense.py (TorchBackend), swap.py (the layer swapping native and SparseProp share),
choice.py (which layers run sparse: eligibility, timed comparison, cached choices), shapes.py,
native/ (the project's kernels), sparseprop.py. `BACKENDS` is a `Registry` of name -> factory
`(model, device, method_name, **options)`; native and SparseProp are imported only when chosen.
"""

from __future__ import annotations

import importlib
import sys

import torch
from torch import nn

from ..methods import METHODS, method_class
from ..registry import Registry
from .dense import TorchBackend

__all__ = ["BACKENDS", "TorchBackend", "make_backend", "sparseprop_available"]

BACKENDS: Registry = Registry("backend")


def sparseprop_available() -> bool:
    try:
        importlib.import_module("sparseprop")
    except Exception:  # noqa: BLE001 - a broken build is as unavailable as a missing one
        return False
    return True


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _has_coarse_steps(method_name: str) -> bool:
    """Does the method have coarse steps the sparse CPU backends serve (ML LinBreg)? Unknown: no."""
    return method_name in METHODS and method_class(method_name).has_coarse_steps


def make_backend(name: str, model: nn.Module, device: torch.device, method_name: str, **options):
    """`auto`: on CPU for ML LinBreg (not distributed) the native kernels when they build and pass their
    self-check, else SparseProp when installed, else torch layers; anything else gets torch layers."""
    return BACKENDS.get(name)(model, device, method_name, **options)


def _cpu_only(name: str, device: torch.device) -> None:
    if _distributed():
        # a swapped layer's dense weight gets its gradient after backward, outside autograd:
        # DDP's reducer would never see it (unsynchronized gradients or a hang)
        raise ValueError(f"backend={name} does not work with distributed (DDP) training; use backend=torch")
    if device.type != "cpu":
        raise ValueError(f"backend={name} runs on the CPU only, not on device {device}; use backend=torch")


def _native_backend(model: nn.Module, **options):
    from .native.backend import NativeBackend

    return NativeBackend(model, **options)


def _sparseprop_backend(model: nn.Module, precision: str = "fp32", channels_last: bool = False, **options):
    # SparseProp layers run fp32 outside autocast only: a bf16 run keeps them dense (see sparseprop.py)
    from .sparseprop import SparsePropBackend

    return SparsePropBackend(model, **options)


@BACKENDS.register("auto")
def _auto(model: nn.Module, device: torch.device, method_name: str, **options):
    if not (device.type == "cpu" and _has_coarse_steps(method_name) and not _distributed()):
        return TorchBackend(model)
    from .native import build

    try:
        build.load()
    except build.NativeUnavailable as err:
        fallback = "SparseProp" if sparseprop_available() else "torch layers"
        # one line on stderr, not a Python warning with its source line: this is the newcomer's first run
        print(f"mlbreg: note: native kernels unavailable ({err}); backend=auto uses {fallback}", file=sys.stderr)
    else:
        return _native_backend(model, **options)
    if not sparseprop_available():
        return TorchBackend(model)
    return _sparseprop_backend(model, **options)


@BACKENDS.register("torch")
def _torch(model: nn.Module, device: torch.device, method_name: str, **options):
    return TorchBackend(model)


@BACKENDS.register("native")
def _native(model: nn.Module, device: torch.device, method_name: str, **options):
    _cpu_only("native", device)
    from .native import build

    try:
        build.load()
    except build.NativeUnavailable as err:
        raise RuntimeError(f"backend=native: {err}; or use backend=auto / torch") from err
    return _native_backend(model, **options)


@BACKENDS.register("sparseprop")
def _sparseprop(model: nn.Module, device: torch.device, method_name: str, **options):
    _cpu_only("sparseprop", device)
    if not sparseprop_available():
        raise RuntimeError(
            "backend=sparseprop needs the SparseProp package: pip install pybind11 scipy && "
            "pip install --no-build-isolation 'sparseprop>=0.1.14' (see docs/backends.md); "
            "or use backend=torch"
        )
    return _sparseprop_backend(model, **options)
