"""ML LinBreg's coarse steps on the sparse CPU kernels in any PyTorch training loop: ``mlbreg.sparse_steps``.

    opt = MLLinBreg(split_param_groups(model, reg="l1", lam=0.1), lr=0.1, momentum=0.9, m=100)
    steps = mlbreg.sparse_steps(model, opt)          # backend="auto": the native kernels on the CPU
    for x, y in loader:                              # the loop itself is unchanged
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    print(steps.report())                            # per layer: native / dense / fused, and why
    steps.remove()                                   # the plain model and optimizer again

It drives a layer backend (mlbreg.backends) from hooks, the way ``mlbreg train`` drives it explicitly:

* a forward pre-hook on the model: in training mode, ``backend.before_step(kind)`` with the kind of the
  optimizer's next step (``next_step_is_fine()``: a fine step runs dense layers, a coarse step the sparse
  ones, the support rebuilt after each fine step); in eval mode ``backend.use_dense()``. The first training
  batch gives the batch size and input shape of the timed per-layer choice;
* the sparse layers' gradients reach the dense ``weight.grad`` when backward accumulates them (a hook in
  backends/swap.py), so gradient clipping or accumulation between ``backward()`` and ``step()`` sees them;
  an optimizer step pre-hook calls ``backend.after_backward()`` (for backends without that hook);
* an optimizer step post-hook: ``backend.after_step(kind)`` (the updated dense weights -> the sparse values);
* ``load_state_dict`` post-hooks on the model and the optimizer: the structure is rebuilt from what was
  loaded before the next coarse step.

The dense ``weight`` parameters stay the single source of truth: the optimizer, ``state_dict()`` and any
metric only see them, and the module tree never changes (swapped layers get an instance ``forward``; a module
the fused graph replaces keeps one while the handle lives, which runs the module's own forward outside coarse
steps and in eval mode). ``copy.deepcopy(model)`` and ``torch.save(model)`` work at any time: the copy is a
plain model (its hooks do nothing, its forwards are its classes').
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backends import make_backend
from .backends.swap_layer import Installed

__all__ = ["SparseSteps", "sparse_steps"]


def sparse_steps(model: nn.Module, optimizer: torch.optim.Optimizer, backend: str = "auto", **options: Any) -> SparseSteps:
    """Run `optimizer`'s coarse steps (an ``mlbreg.optim.MLLinBreg``) on sparse layers in your own loop.

    Args:
        model: any nn.Module on the CPU; its Conv2d / Linear layers are candidates, its conv -> BatchNorm ->
            [add] -> ReLU chains are fused where its torch.fx graph shows them (see docs/own-model.md).
        optimizer: an MLLinBreg over the model's parameters (e.g. ``split_param_groups(model, ...)``).
        backend: "auto" (the native kernels when they build, else SparseProp when installed, else torch
            layers), "native", "sparseprop" or "torch" (nothing swapped: the same numbers, dense speed).
        options: passed to the backend: ``precision`` ("fp32" | "bf16": the loop runs under CPU bf16
            autocast), ``channels_last``, ``force`` (every eligible layer sparse, untimed), ``min_speedup``,
            ``choice_store`` (None: time in this process only), ``batch_size`` / ``in_shape`` (default: the
            first training batch's).
    Returns the handle: ``summary()`` / ``report()``, ``state_dict()`` / ``load_state_dict()`` (the timed
    layer choices, for a resumed run that chooses alike), ``use_dense()``, ``remove()``; a context manager.
    """
    return SparseSteps(model, optimizer, backend, **options)


def _has_coarse_steps(optimizer) -> bool:
    return callable(getattr(optimizer, "next_step_is_fine", None))


class SparseSteps:
    """The installed hooks and the backend they drive; see the module docstring."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, backend: str = "auto", **options: Any):
        if not isinstance(model, nn.Module):
            raise TypeError(f"sparse_steps needs an nn.Module, got {type(model).__name__}")
        coarse = _has_coarse_steps(optimizer)
        if backend != "torch" and backend != "auto" and not coarse:
            raise ValueError(
                f"backend={backend!r} runs ML LinBreg's coarse steps; {type(optimizer).__name__} has "
                "none: use mlbreg.optim.MLLinBreg, or backend='torch'"
            )
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        self.model, self.optimizer = model, optimizer
        self.backend = make_backend(backend, model, device, "mllinbreg" if coarse else "sgd", optimizer=optimizer, **options)
        self._kind = "dense"
        # Installed: a copy or pickle of the model or optimizer carries no-op hooks instead of these
        hooks = [
            model.register_forward_pre_hook(Installed(self._before_forward)),
            optimizer.register_step_pre_hook(Installed(self._before_step)),
            optimizer.register_step_post_hook(Installed(self._after_step)),
            model.register_load_state_dict_post_hook(Installed(self._loaded)),
        ]
        if hasattr(optimizer, "register_load_state_dict_post_hook"):
            hooks.append(optimizer.register_load_state_dict_post_hook(Installed(self._loaded)))
        self._hooks = hooks
        if hasattr(self.backend, "pin_graph_roots"):
            # the model's forward is looked up before its pre-hook switches phases: a fused graph installed
            # on the model itself must be there already and decide when called
            self.backend.pin_graph_roots(True)

    # -- the hooks -------------------------------------------------------------------------
    def _next_kind(self) -> str:
        if not _has_coarse_steps(self.optimizer):
            return "dense"
        return "full_grad" if self.optimizer.next_step_is_fine() else "sparse"

    def _before_forward(self, module, args) -> None:
        if not module.training:
            self.backend.use_dense()
            return
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            if getattr(self.backend, "batch_size", 0) is None:
                self.backend.batch_size = int(x.shape[0])
            if getattr(self.backend, "in_shape", ()) is None:
                self.backend.in_shape = tuple(x.shape[1:])
        self.backend.before_step(self._next_kind())

    def _before_step(self, optimizer, args, kwargs) -> None:
        self.backend.after_backward()
        self._kind = self._next_kind()

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.backend.after_step(self._kind)

    def _loaded(self, *args) -> None:
        self.backend.invalidate()

    # -- the handle ------------------------------------------------------------------------
    @property
    def fusions(self) -> list:
        """The fused conv -> BatchNorm -> [add] -> ReLU chains (native backend; else empty)."""
        return list(getattr(self.backend, "fusions", []))

    def summary(self) -> list[dict[str, Any]]:
        """One row per prunable layer (layer, kind, choice, why, ...: its current choice; before the first coarse
        step every layer is dense), then per BatchNorm2d, pooling layer and untraceable module (native)."""
        rows = list(self.backend.summary()) if hasattr(self.backend, "summary") else []
        return rows + (self.backend.fusion_summary() if hasattr(self.backend, "fusion_summary") else [])

    def report(self) -> str:
        """``summary()`` as a text table, headed by the backend and the number of fused chains."""
        rows = self.summary()
        width = max([len(str(r["layer"])) for r in rows] + [5])
        head = f"backend={self.backend.name}: {len(self.fusions)} fused conv -> BN -> [add] -> ReLU chains"
        if not rows:
            return head + "; nothing swapped (torch layers)"
        return "\n".join([head] + [f"  {r['layer']:{width}s} {r['kind']:9s} {r['choice']:12s} {r['why']}" for r in rows])

    def state_dict(self) -> dict:
        """The backend's timed layer choices (save with the model and optimizer: a resumed loop that loads them
        makes the same choices, and so computes the same numbers, as the loop it continues)."""
        return self.backend.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.backend.load_state_dict(state)

    def use_dense(self) -> None:
        """Plain dense modules until the next training forward (e.g. before pickling or copying the model)."""
        self.backend.use_dense()

    def remove(self) -> None:
        """Dense layers and no hooks: the model and optimizer as they were."""
        self.backend.use_dense()
        if hasattr(self.backend, "pin_graph_roots"):
            self.backend.pin_graph_roots(False)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def __enter__(self) -> SparseSteps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
