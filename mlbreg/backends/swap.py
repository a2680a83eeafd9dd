"""What the CPU sparse backends (native, SparseProp) share: swapping sparse layers in for ML LinBreg's
coarse steps, around the training loop's hooks, with the dense ``weight`` as the single source of truth.

* ``before_step("sparse")``: after a fine step, rebuild every layer's structure from the support S
  (the optimizer's ``state[w]["support"]`` when the optimizer is known, else ``w != 0``), choose which
  layers to swap (a timed comparison per layer shape and bin of support sizes, timed once per machine:
  see backends/choice.py and choice_store.py) and install their forwards; after
  ``use_dense()`` with no fine step in between, re-enable the same layers without rebuilding.
* ``before_step("full_grad" | "dense")``: dense layers.
* ``after_backward()``: the value gradients of the swapped layers are scattered into a per-cycle
  buffer that is zero outside the structure, which becomes ``weight.grad`` (a hook on each value
  vector does it when backward accumulates its gradient, so ``weight.grad`` is complete when
  ``backward()`` returns and ``after_backward()`` finds nothing left to do).
* ``after_step("sparse")``: the updated dense values are gathered into the layers' ``w_val``.

A swapped layer gets an instance attribute ``module.forward`` (``nn.Module.__call__`` calls it, so
hooks still run); deleting it makes the layer dense again. The module tree never changes, and a copy or
pickle of the model gets plain forwards and no-op hooks instead (``swap_layer.Installed``).
Subclasses provide the eligibility reasons, the structure, the timed comparison and the forwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models import prunable_modules
from .choice import LayerChoice
from .choice_store import default_store
from .memory_order import memory_flat, memory_index
from .shapes import ensure_shapes, shape_hook
from .swap_layer import Installed, SwapLayer, single_thread


class LayerSwapBackend:
    """The shared machinery; see the module docstring. Subclasses define ``name`` and the hooks below
    (``_reason``, ``_build``, ``_forced_mode``, ``_time_layer``, ``_sparse_forward``)."""

    name = "swap"

    def __init__(
        self,
        model: nn.Module,
        batch_size: int | None = None,
        in_shape=None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        force: bool = False,
        min_speedup: float = 1.05,
        warmup: int = 1,
        repeats: int = 3,
        bucket: float = 0.1,
        choice_store: Any = "machine",
    ):
        self.model = model
        self.batch_size = batch_size
        self.in_shape = tuple(in_shape) if in_shape is not None else None
        self.optimizer = optimizer
        self.min_speedup = min_speedup
        self.warmup = warmup
        self.repeats = max(1, repeats)
        if choice_store == "machine":
            choice_store = None if force else default_store()
        self.choices = LayerChoice(force=force, bucket=bucket, store=choice_store, context=self._choice_context())
        self._record: dict[tuple[str, str], dict[str, Any]] = {}  # (layer, key) -> the choice made
        self.rebuilds = 0
        self.layers: list[SwapLayer] = []
        for name, mod in prunable_modules(model):
            kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
            self.layers.append(SwapLayer(name, mod, kind, self._reason(mod, kind)))
        self._stale = True  # the structure must be (re)built before the next sparse step
        self._active = False  # are the swapped layers' forwards installed?
        for layer in self.layers:
            if layer.reason is None:
                layer.module.register_forward_pre_hook(Installed(shape_hook(layer)))
        self._generator = torch.Generator().manual_seed(0)  # timing inputs: leave the global RNG alone

    @property
    def decisions(self) -> dict[str, dict]:
        """key -> dict(nnz, mode, why, timings): this run's layer choices (backends/choice.py)."""
        return self.choices.decisions

    @property
    def timing_seconds(self) -> float:
        """Time spent in the timed comparisons."""
        return self.choices.timing_seconds

    # -- subclass hooks --------------------------------------------------------------------
    def _choice_context(self) -> str:
        """What besides the layer decides its timing (kernels, precision, ...): part of the choice keys."""
        return f"{self.name} min_speedup={self.min_speedup:g}"

    def _reason(self, mod: nn.Module, kind: str) -> str | None:
        raise NotImplementedError

    def _build(self, layer: SwapLayer, mask: torch.Tensor) -> str | None:
        """Set layer.idx, layer.kernel, layer.nnz from the support mask; return why the layer must
        stay dense, or None."""
        raise NotImplementedError

    def _forced_mode(self, layer: SwapLayer) -> Any:
        raise NotImplementedError

    def _time_layer(self, layer: SwapLayer) -> tuple[Any, str, dict]:
        raise NotImplementedError

    def _sparse_forward(self, layer: SwapLayer, x: torch.Tensor) -> torch.Tensor:
        """The layer without its bias on the sparse kernels."""
        raise NotImplementedError

    linear_any_rank = False  # may a swapped linear layer take (..., F) inputs, not only (B, F)?
    # may the sparse layers run under bf16 autocast (bf16 or fp32 inputs; the backend computes in fp32)?
    runs_under_autocast = False

    def _activate_extra(self) -> None:
        """Install anything beyond the swapped layers (native: BatchNorm, fused blocks)."""

    def _deactivate_extra(self) -> None:
        pass

    # -- hooks called by the training loop ---------------------------------------------
    def before_step(self, kind: str) -> None:
        if kind == "sparse":
            if self._stale:
                self._rebuild()
            elif not self._active:
                self._activate(refresh=True)
        elif self._active:
            self._deactivate()

    def after_backward(self) -> None:
        if self._active:
            for layer in self.layers:
                layer.take_grad()

    def after_step(self, kind: str) -> None:
        if kind != "sparse":
            self._stale = True  # a fine step may have changed the support
            return
        if self._active:
            self._refresh_values()

    def use_dense(self) -> None:
        """Back to dense layers (before evaluation or checkpointing)."""
        if self._active:
            self._deactivate()

    def invalidate(self) -> None:
        """The weights or the support changed outside these hooks (a loaded state_dict): dense layers now,
        and a rebuild before the next sparse step."""
        self.use_dense()
        self._stale = True

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The timed layer choices: a resumed run makes the same choices (and so the same numbers)
        as the run it continues, instead of timing again under another machine load."""
        return self.choices.state_dict(self.name)

    def load_state_dict(self, state: dict) -> None:
        self.choices.load_state_dict(state, self.name)

    # -- reports -------------------------------------------------------------------------
    def _choice_label(self, layer: SwapLayer) -> str:
        return "dense" if not layer.swapped else "sparse"

    def summary(self) -> list[dict[str, Any]]:
        """One row per prunable layer: the current choice and why."""
        return [layer.summary_row(self._choice_label(layer)) for layer in self.layers]

    def choice_record(self) -> list[dict[str, Any]]:
        """Every choice this run made, once per (layer, choice key), in order: the layer, its support size,
        sparse or dense, why and what decided it (written to the run's env.json)."""
        return list(self._record.values())

    def _record_choices(self) -> None:
        for layer in self.layers:
            key = (layer.name, layer.choice_key or layer.decided_by or "ineligible")
            if key not in self._record:
                self._record[key] = dict(
                    layer=layer.name,
                    nnz=layer.nnz,
                    choice=self._choice_label(layer),
                    why=layer.reason or layer.why,
                    decided_by=layer.decided_by or "ineligible",
                    key=layer.choice_key,
                )

    def swapped_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.swapped]

    # -- structure ----------------------------------------------------------------------
    def _support(self, layer: SwapLayer) -> torch.Tensor:
        mask = layer.weight.detach() != 0
        if self.optimizer is not None:
            s = self.optimizer.state.get(layer.weight, {}).get("support")
            if s is not None:
                mask |= s.to(torch.bool)
        return mask

    def _rebuild(self) -> None:
        if self._active:
            self._deactivate()
        ensure_shapes(self.model, self.layers, self.in_shape)
        for layer in self.layers:
            self._rebuild_layer(layer, settle=False)
        self._settle_choices()
        self._record_choices()
        for layer in self.layers:
            self._drop_if_dense(layer)
        self._stale = False
        self.rebuilds += 1
        self._activate(refresh=False)

    def _settle_choices(self) -> None:
        """After every layer's timed choice: a backend may revise the choices jointly (native: the
        conversions between dense and native neighbours)."""

    @staticmethod
    def _drop_if_dense(layer: SwapLayer) -> None:
        if layer.mode is None:
            layer.idx, layer.w_val, layer.kernel = None, None, None

    def _rebuild_layer(self, layer: SwapLayer, settle: bool = True) -> None:
        """The structure of `layer`, then the timed choice between it and the dense layer (`settle`:
        drop the structure now if dense; a whole rebuild settles the choices jointly first)."""
        layer.clear()
        if layer.reason is not None:
            layer.nnz, layer.why = int(torch.count_nonzero(layer.weight.detach())), layer.reason
            return
        with torch.no_grad(), single_thread():
            why = self._build(layer, self._support(layer))
        if why is None and layer.nnz == 0:
            why = "no non-zeros"
        if why is not None:
            layer.clear()
            layer.why = why
            return
        layer.mem_idx, layer.weight_strides = memory_index(layer.weight, layer.idx), layer.weight.stride()
        layer.w_val = memory_flat(layer.weight.detach()).index_select(0, layer.mem_idx).requires_grad_(True)
        # the dense weight.grad as soon as backward is done: code between backward and the step (gradient
        # clipping, a GradScaler, accumulation) sees it; after_backward() is then a no-op
        layer.w_val.register_post_accumulate_grad_hook(layer.take_grad)
        # timed at the training thread count
        layer.mode, layer.why = self.choices.choose(layer, self.batch_size, self._forced_mode, self._time_layer)
        if settle:
            self._drop_if_dense(layer)

    # -- swapping -----------------------------------------------------------------------
    def _forward_fn(self, layer: SwapLayer):
        mod = layer.module
        dense_forward = type(mod).forward

        def forward(x):
            if not layer.accepts(x, self.linear_any_rank, self.runs_under_autocast):
                return dense_forward(mod, x)
            out = self._sparse_forward(layer, x)
            if mod.bias is None:
                return out
            bias = mod.bias.to(out.dtype)  # a bf16 output stays bf16 (as a conv under autocast)
            return out + (bias.view(1, -1, 1, 1) if layer.kind == "conv" else bias)

        return forward

    def _activate(self, refresh: bool) -> None:
        if refresh:
            self._check_structure()
            self._refresh_values()
        for layer in self.layers:
            if layer.swapped:
                layer.module.forward = Installed(self._forward_fn(layer), layer.module)
        self._activate_extra()
        self._active = True

    def _deactivate(self) -> None:
        for layer in self.layers:
            if "forward" in layer.module.__dict__:
                del layer.module.forward
            if layer.w_val is not None:
                layer.w_val.grad = None
            layer.grad_buf = None  # dense steps may write into an exposed buffer: never reuse it
        self._deactivate_extra()
        self._active = False

    def _check_structure(self) -> None:
        """Re-enabling without a rebuild: every non-zero must still lie in the structure
        (else someone changed the weights since: rebuild instead)."""
        for layer in self.layers:
            if layer.swapped and layer.structure_moved():
                self._rebuild_layer(layer)

    @torch.no_grad()
    def _refresh_values(self) -> None:
        for layer in self.layers:
            if layer.swapped:
                w = layer.weight.detach()
                if layer.mem_idx is None or w.stride() != layer.weight_strides:
                    layer.mem_idx, layer.weight_strides = memory_index(w, layer.idx), w.stride()
                torch.index_select(memory_flat(w), 0, layer.mem_idx, out=layer.w_val.data)
