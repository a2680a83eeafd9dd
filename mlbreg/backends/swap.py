"""What the CPU sparse backends (native, SparseProp) share: swapping sparse layers in for ML LinBreg's
coarse steps, around the training loop's hooks, with the dense ``weight`` as the single source of truth.

* ``before_step("sparse")``: after a fine step, rebuild every layer's structure from the support S
  (the optimizer's ``state[w]["support"]`` when the optimizer is known, else ``w != 0``), choose which
  layers to swap (a timed comparison, cached per layer while its nnz stays within a factor
  1 + ``bucket`` of the nnz it was timed at) and install their forwards; after ``use_dense()`` with no
  fine step in between, re-enable the same layers without rebuilding.
* ``before_step("full_grad" | "dense")``: dense layers.
* ``after_backward()``: the value gradients of the swapped layers are scattered into a per-cycle
  buffer that is zero outside the structure (never written there), which becomes ``weight.grad``.
* ``after_step("sparse")``: the updated dense values are gathered into the layers' ``w_val``.

A swapped layer gets an instance attribute ``module.forward`` (``nn.Module.__call__`` calls it, so
hooks still run); deleting it makes the layer dense again. The module tree never changes.
Subclasses provide the eligibility reasons, the structure, the timed comparison and the forwards.
"""
from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..models import prunable_modules


@contextmanager
def single_thread():
    """Many small index ops: no OpenMP fork/join per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def timed_rounds(candidates: dict, warmup: int, repeats: int, reset) -> dict[str, float]:
    """Median seconds of each candidate (a callable; "dense" among them): `warmup` untimed calls each,
    then `repeats` interleaved rounds (a load change hits all candidates alike); after the first round
    a candidate 3x slower than the best is dropped. `reset()` runs after every call (clear gradients)."""
    candidates = dict(candidates)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.enable_grad():
        for _ in range(warmup):
            for fn in candidates.values():
                fn()
                reset()
        for r in range(repeats):
            for name, fn in list(candidates.items()):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
                reset()
            if r == 0 and repeats > 1:
                best = min(v[0] for v in times.values())
                for name in [n for n in candidates if n != "dense" and times[n][0] > 3 * best]:
                    del candidates[name]
    return {name: statistics.median(v) for name, v in times.items()}


def autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # older torch
        return torch.is_autocast_cpu_enabled()


def not_fp32_cpu(w: torch.Tensor, kernels: str) -> Optional[str]:
    if w.dtype != torch.float32 or w.device.type != "cpu":
        return f"weight is {w.dtype} on {w.device}; {kernels} fp32 CPU only"
    return None


def conv_reason(conv: nn.Module, kernels: str, strides: Optional[tuple] = None) -> Optional[str]:
    """None if a plain sparse conv kernel computes `conv`, else why not: nn.Conv2d exactly, fp32 CPU,
    groups 1, dilation 1, square kernel, integer symmetric zero padding below the kernel size, and a
    stride in `strides` (None: any equal pair)."""
    if type(conv) is not nn.Conv2d:
        return "not a plain nn.Conv2d"
    if not_fp32_cpu(conv.weight, kernels):
        return not_fp32_cpu(conv.weight, kernels)
    if conv.groups != 1:
        return f"groups={conv.groups}"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation={tuple(conv.dilation)}"
    kh, kw = conv.kernel_size
    if kh != kw:
        return f"non-square kernel {kh}x{kw}"
    stride = tuple(conv.stride)
    if strides is not None and stride not in strides:
        return f"stride={stride}"
    if stride[0] != stride[1]:
        return f"stride={stride} (needs equal strides)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    pad = conv.padding
    if isinstance(pad, str) or len(pad) != 2 or pad[0] != pad[1] or not isinstance(pad[0], int):
        return f"padding={pad!r} (needs integer symmetric padding)"
    if not 0 <= pad[0] < kh:
        return f"padding {pad[0]} not below the kernel size {kh}"
    return None


def linear_reason(linear: nn.Module, kernels: str) -> Optional[str]:
    if type(linear) is not nn.Linear:
        return "not a plain nn.Linear"
    return not_fp32_cpu(linear.weight, kernels)


@dataclass
class SwapLayer:
    """One prunable layer and, while a structure is built, its sparse form."""
    name: str
    module: nn.Module
    kind: str                                   # "conv" | "linear"
    reason: Optional[str]                       # static guard failure (None: eligible)
    in_shape: Optional[tuple] = None            # per-sample input shape seen in a forward
    in_grad: bool = True                        # does the layer's input require grad in training?
    idx: Optional[torch.Tensor] = None          # int64 flat positions of the structure in the dense weight
    w_val: Optional[torch.Tensor] = None        # fp32 values on idx, a leaf that gets .grad
    kernel: Any = None                          # the backend's structure for its kernels
    nnz: int = 0
    grad_buf: Optional[torch.Tensor] = None     # dense weight gradient buffer of this coarse phase
    mode: Any = None                            # None: dense; else the backend's sparse mode
    why: str = ""                               # why this choice (for reports)
    timings: dict = field(default_factory=dict)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def swapped(self) -> bool:
        return self.mode is not None

    def clear(self) -> None:
        self.mode, self.idx, self.w_val, self.kernel, self.grad_buf, self.timings = None, None, None, None, None, {}


class LayerSwapBackend:
    """The shared machinery; see the module docstring. Subclasses define ``name`` and the hooks below
    (``_reason``, ``_build``, ``_forced_mode``, ``_time_layer``, ``_forward_fn``)."""
    name = "swap"

    def __init__(self, model: nn.Module, batch_size: Optional[int] = None, in_shape=None, *,
                 optimizer: Optional[torch.optim.Optimizer] = None, force: bool = False, min_speedup: float = 1.05,
                 warmup: int = 1, repeats: int = 3, bucket: float = 0.1):
        self.model = model
        self.batch_size = batch_size
        self.in_shape = tuple(in_shape) if in_shape is not None else None
        self.optimizer = optimizer
        self.force = force
        self.min_speedup = min_speedup
        self.warmup = warmup
        self.repeats = max(1, repeats)
        self.bucket = bucket
        self.timing_seconds = 0.0     # the timed comparisons
        self.rebuilds = 0
        self.decisions: dict[tuple, list[tuple[int, Any, str, dict]]] = {}   # key -> [(nnz, mode, why, timings)]
        self.layers: list[SwapLayer] = []
        for name, mod in prunable_modules(model):
            kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
            self.layers.append(SwapLayer(name, mod, kind, self._reason(mod, kind)))
        self._stale = True            # the structure must be (re)built before the next sparse step
        self._active = False          # are the swapped layers' forwards installed?
        for layer in self.layers:
            if layer.reason is None:
                layer.module.register_forward_pre_hook(self._shape_hook(layer))
        self._generator = torch.Generator().manual_seed(0)    # timing inputs: leave the global RNG alone

    # -- subclass hooks --------------------------------------------------------------------
    def _reason(self, mod: nn.Module, kind: str) -> Optional[str]:
        raise NotImplementedError

    def _build(self, layer: SwapLayer, mask: torch.Tensor) -> Optional[str]:
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

    linear_any_rank = False           # may a swapped linear layer take (..., F) inputs, not only (B, F)?

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
        if not self._active:
            return
        for layer in self.layers:
            if not layer.swapped or layer.w_val.grad is None:
                continue                      # dense, or not used in this step
            g = layer.w_val.grad
            layer.w_val.grad = None
            w = layer.weight
            if w.grad is None:                # the usual case: the dense weight took no part
                if layer.grad_buf is None:
                    with single_thread():
                        layer.grad_buf = torch.zeros(w.shape, dtype=w.dtype)
                layer.grad_buf.view(-1).scatter_(0, layer.idx, g)
                w.grad = layer.grad_buf
            else:                             # a dense fallback ran too, or grads were not reset: accumulate
                w.grad.view(-1).index_add_(0, layer.idx, g)

    def after_step(self, kind: str) -> None:
        if kind != "sparse":
            self._stale = True                # a fine step may have changed the support
            return
        if self._active:
            self._refresh_values()

    def use_dense(self) -> None:
        """Back to dense layers (before evaluation or checkpointing)."""
        if self._active:
            self._deactivate()

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The timed layer choices: a resumed run makes the same choices (and so the same numbers)
        as the run it continues, instead of timing again under another machine load."""
        return dict(backend=self.name, decisions={k: list(v) for k, v in self.decisions.items()})

    def load_state_dict(self, state: dict) -> None:
        if state.get("backend") == self.name:   # another backend's choices mean nothing here
            self.decisions = {tuple(k): list(v) for k, v in state["decisions"].items()}

    # -- reports -------------------------------------------------------------------------
    def _choice_label(self, layer: SwapLayer) -> str:
        return "dense" if not layer.swapped else "sparse"

    def summary(self) -> list[dict[str, Any]]:
        """One row per prunable layer: the current choice and why."""
        rows = []
        for layer in self.layers:
            numel = layer.weight.numel()
            rows.append(dict(layer=layer.name, kind=layer.kind, in_shape=layer.in_shape, nnz=layer.nnz,
                             density=layer.nnz / numel if numel else 0.0, choice=self._choice_label(layer),
                             why=layer.reason or layer.why, **layer.timings))
        return rows

    def swapped_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.swapped]

    # -- structure ----------------------------------------------------------------------
    def _shape_hook(self, layer: SwapLayer):
        def hook(mod, args):
            if args and isinstance(args[0], torch.Tensor) and torch.is_grad_enabled() and mod.training:
                layer.in_shape = tuple(args[0].shape[1:])
                layer.in_grad = bool(args[0].requires_grad)
        return hook

    def _ensure_shapes(self) -> None:
        """Input shapes of layers no dense step has shown yet: one dummy forward (eval, no grad)."""
        missing = [layer for layer in self.layers if layer.reason is None and layer.in_shape is None]
        if not missing or self.in_shape is None:
            return
        seen: dict[int, tuple] = {}

        def recorder(layer):
            def hook(mod, args):
                seen.setdefault(id(layer), (tuple(args[0].shape[1:]), args[0]))
            return hook

        handles = [layer.module.register_forward_pre_hook(recorder(layer)) for layer in missing]
        was_training = self.model.training
        param = next(self.model.parameters())
        x = torch.zeros((2,) + self.in_shape, dtype=param.dtype, device=param.device)
        try:
            self.model.eval()                 # no BN statistics touched
            with torch.no_grad():
                self.model(x)
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        for layer in missing:
            if id(layer) in seen:
                shape, inp = seen[id(layer)]
                layer.in_shape, layer.in_grad = shape, inp is not x

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
        self._ensure_shapes()
        for layer in self.layers:
            self._rebuild_layer(layer)
        self._stale = False
        self.rebuilds += 1
        self._activate(refresh=False)

    def _rebuild_layer(self, layer: SwapLayer) -> None:
        """The structure of `layer`, then the timed choice between it and the dense layer."""
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
        layer.w_val = layer.weight.detach().reshape(-1).index_select(0, layer.idx).requires_grad_(True)
        layer.mode, layer.why = self._choose(layer)   # timed at the training thread count
        if layer.mode is None:
            layer.idx, layer.w_val, layer.kernel = None, None, None

    def _choose(self, layer: SwapLayer) -> tuple[Any, str]:
        if self.force:
            return self._forced_mode(layer), "forced"
        if layer.in_shape is None or not self.batch_size:
            return None, "input shape unknown (no dense step seen, no in_shape)"
        # a decision timed at nnz0 holds for nnz within a factor (1 + bucket) of nnz0 (no fixed
        # bucket edges: a support that moves by a few weights never triggers a re-timing)
        key = (layer.name, layer.in_shape, layer.in_grad, self.batch_size, torch.get_num_threads())
        entries = self.decisions.setdefault(key, [])
        width = math.log1p(self.bucket)
        near = [e for e in entries if abs(math.log(layer.nnz / e[0])) <= width]
        if near:
            entry = min(near, key=lambda e: abs(math.log(layer.nnz / e[0])))
        else:
            t0 = time.perf_counter()
            entry = (layer.nnz, *self._time_layer(layer))
            self.timing_seconds += time.perf_counter() - t0
            entries.append(entry)
        _, mode, why, timings = entry
        layer.timings = timings
        return mode, why

    # -- swapping -----------------------------------------------------------------------
    def _runs_sparse(self, layer: SwapLayer, x) -> bool:
        """An fp32 CPU input of the expected shape outside autocast; anything else runs the dense layer."""
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu"
                and x.numel() > 0 and not autocast_on()):
            return False
        mod = layer.module
        if layer.kind == "conv":
            return x.dim() == 4 and x.shape[1] == mod.in_channels
        return (x.dim() >= 1 if self.linear_any_rank else x.dim() == 2) and x.shape[-1] == mod.in_features

    def _forward_fn(self, layer: SwapLayer):
        mod = layer.module
        dense_forward = type(mod).forward

        def forward(x):
            if not self._runs_sparse(layer, x):
                return dense_forward(mod, x)
            out = self._sparse_forward(layer, x)
            if mod.bias is None:
                return out
            return out + (mod.bias.view(1, -1, 1, 1) if layer.kind == "conv" else mod.bias)
        return forward

    def _activate(self, refresh: bool) -> None:
        if refresh:
            self._check_structure()
            self._refresh_values()
        for layer in self.layers:
            if layer.swapped:
                layer.module.forward = self._forward_fn(layer)
        self._activate_extra()
        self._active = True

    def _deactivate(self) -> None:
        for layer in self.layers:
            if "forward" in layer.module.__dict__:
                del layer.module.forward
            if layer.w_val is not None:
                layer.w_val.grad = None
            layer.grad_buf = None             # dense steps may write into an exposed buffer: never reuse it
        self._deactivate_extra()
        self._active = False

    def _check_structure(self) -> None:
        """Re-enabling without a rebuild: every non-zero must still lie in the structure
        (else someone changed the weights since: rebuild instead)."""
        for layer in self.layers:
            if layer.swapped:
                w = layer.weight.detach().reshape(-1)
                with single_thread():
                    moved = int(torch.count_nonzero(w)) != int(torch.count_nonzero(w.index_select(0, layer.idx)))
                if moved:
                    self._rebuild_layer(layer)

    @torch.no_grad()
    def _refresh_values(self) -> None:
        for layer in self.layers:
            if layer.swapped:
                torch.index_select(layer.weight.detach().reshape(-1), 0, layer.idx, out=layer.w_val.data)
