"""SparseProp backend: ML LinBreg's coarse steps on CPU sparse layers (SparseProp, Nikdan et al. 2023).

How it works
------------
The swapping around the training loop's hooks (structure from the support S after a fine step,
timed per-layer choice, value gradients scattered into ``weight.grad``, values gathered back after
each coarse step) is shared with the native backend: see ``mlbreg/backends/swap.py`` (the timed choice:
``mlbreg/backends/choice.py``). This module
holds SparseProp's guards, its index format and the autograd functions around its kernels; a dense
bias is added by plain torch ops so its gradient flows as usual.

The structure is a superset of S; weights of S that shrink to 0 during a cycle keep their slot
(SparseProp's own ``dense != 0`` constructor would drop them, so the index tensors are built here).

Guards (SparseProp returns silently wrong results without them, see ../shared/sparseprop-notes.md)
------------------------------------------------------------------------------------------------
1. every input (and every incoming gradient) is copied into the exact contiguous layout the kernel
   reads (NCHW for the over-``on`` kernels, batch-innermost CHWB for the others), whatever its
   strides (non-contiguous views, channels_last); outputs and input gradients are handed back as
   contiguous NCHW (BatchNorm & co. copy a permuted view twice); the linear layer's transposes are
   torch copies (SparseProp's SIMD transpose needs aligned memory);
2. a batch whose size is not a multiple of 8 is zero-padded to the next multiple of 8 inside
   the sparse conv and the output sliced back (the padded samples have zero input and zero
   incoming gradient, so they add nothing: the result is the same up to fp32 summation order);
3. the incoming gradient of the over-``on`` kernels is made contiguous inside the backward;
4. only ``nn.Conv2d`` (exact type) with groups=1, dilation 1, square kernel, stride (1,1) or
   (2,2), integer symmetric padding < kernel size and padding_mode="zeros" is swapped;
5. a conv with more than 32767 structure entries in one output channel stays dense (int16 index);
6. fp32 only: fp32 CPU weights at swap time, and an input that is not an fp32 CPU tensor of
   the expected shape, or any call under autocast (bf16), runs the dense layer for that call
   (so precision=bf16 gets no sparse speed-up, but the same numbers as backend=torch).
The kernels are called with numpy views of exactly-typed contiguous tensors (a wrong dtype
would make pybind11 write into a silently discarded copy).

Which layers
------------
A layer that passes the guards is swapped when a timed comparison (interleaved rounds after a
warm-up, median, dense vs. both ``vectorizing_over_on`` modes, forward + backward at this
layer's input shape and the training batch size) finds a sparse mode at least ``min_speedup``
times faster. Decisions are keyed by the layer's shape and a fixed bin of support sizes (width
1 + ``bucket``), read from and written to the machine's record (backends/choice.py,
choice_store.py), so a fine step only re-times a layer whose support moves to a bin not timed yet
and two launches of one command choose alike. ``force=True`` swaps
every eligible layer without timing (``force_mode`` picks the ``vectorizing_over_on`` mode;
default: the over-``on`` mode for stride-1 convs). Input shapes come from a forward pre-hook
during dense steps, or from one dummy forward (eval mode, no grad) with ``in_shape``.
Time spent in the timed comparisons accumulates in ``timing_seconds``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .choice import conv_reason, linear_reason, timed_rounds
from .swap import LayerSwapBackend
from .swap_layer import single_thread

try:
    from sparseprop import backend as _spb  # (sparseprop's __init__ imports the top-level extension module `backend`)
except Exception as err:  # noqa: BLE001 - a broken build is as unusable as a missing one
    raise ImportError(
        "the SparseProp backend needs the SparseProp package (pip install pybind11 scipy && "
        "pip install --no-build-isolation 'sparseprop>=0.1.14'); use backend=torch"
    ) from err

__all__ = ["SparsePropBackend", "conv_eligible", "linear_eligible"]

INT16_MAX = 32767
BATCH_ALIGN = 8  # SparseProp's conv kernels are wrong for the last batch % 8 samples


# --------------------------------------------------------------------------- guards
def conv_eligible(conv: nn.Module) -> str | None:
    """None if SparseProp computes this conv correctly, else why not (guards 4 and 6)."""
    if type(conv) is nn.Conv2d and conv.kernel_size[0] > 255:
        return f"kernel {conv.kernel_size[0]} too large for uint8 indices"
    return conv_reason(conv, "SparseProp is", strides=((1, 1), (2, 2)))


def linear_eligible(linear: nn.Module) -> str | None:
    return linear_reason(linear, "SparseProp is")


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    """A numpy view for the kernels, checked: a copy would silently lose the kernel's writes."""
    assert t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu", (t.dtype, t.shape, t.stride())
    return t.detach().numpy()


# --------------------------------------------------------------------------- structure
def _conv_structure(mask: torch.Tensor):
    """SparseProp's conv format for a boolean (OC, IC, K, K) mask, vectorized:
    W_OC int32 (OC+1) offsets per output channel, W_IC int16 (OC*(IC+1)) offsets per
    (oc, ic) inside the channel, W_X/W_Y uint8 kernel positions; plus the flat int64 positions
    in row-major order (the order of the values)."""
    oc, ic, k, _ = mask.shape
    flat = mask.reshape(-1)
    idx = flat.nonzero().squeeze(1)
    per_oc_ic = mask.reshape(oc, ic, k * k).sum(-1, dtype=torch.int64)  # (OC, IC)
    per_oc = per_oc_ic.sum(1)
    w_oc = torch.zeros(oc + 1, dtype=torch.int64)
    torch.cumsum(per_oc, 0, out=w_oc[1:])
    w_ic = torch.zeros(oc, ic + 1, dtype=torch.int64)
    torch.cumsum(per_oc_ic, 1, out=w_ic[:, 1:])
    pos = idx % (k * k)
    w_x = (pos // k).to(torch.uint8)
    w_y = (pos % k).to(torch.uint8)
    return idx, (w_oc.to(torch.int32), w_ic.reshape(-1).to(torch.int16), w_x, w_y), int(per_oc.max()) if oc else 0


def _linear_structure(mask: torch.Tensor):
    """CSR of a boolean (N, M) mask: int32 row offsets and column indices; flat positions."""
    n, m = mask.shape
    idx = mask.reshape(-1).nonzero().squeeze(1)
    indptr = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(mask.sum(1, dtype=torch.int64), 0, out=indptr[1:])
    return idx, (indptr.to(torch.int32), (idx % m).to(torch.int32))


# --------------------------------------------------------------------------- autograd functions
def _conv_out_size(size: int, k: int, pad: int, stride: int) -> int:
    return (size + 2 * pad - k) // stride + 1


class _SparseConvFn(torch.autograd.Function):
    """SparseProp conv (no bias) on a contiguous fp32 NCHW input with batch % 8 == 0."""

    @staticmethod
    def forward(ctx, x, w_val, w_idx, oc, k, pad, stride, voo):
        b, ic, h, w = x.shape
        oh, ow = _conv_out_size(h, k, pad, stride), _conv_out_size(w, k, pad, stride)
        val = _np(w_val, torch.float32)
        idx = (_np(w_idx[0], torch.int32), _np(w_idx[1], torch.int16), _np(w_idx[2], torch.uint8), _np(w_idx[3], torch.uint8))
        if voo:
            x = x.contiguous()  # guard 1: the over-on kernels read NCHW
        if voo and stride == 1:
            out = torch.zeros(b, oc, oh, ow)
            _spb.sparse_conv2d_vectorized_forward_over_on_stride_1(
                _np(x, torch.float32), *idx, val, _np(out, torch.float32), k, pad
            )
            saved = x
        else:
            xp = x.permute(1, 2, 3, 0).contiguous()  # (IC, H, W, B), from any input layout
            outp = torch.zeros(oc, oh, ow, b)
            fn = (
                _spb.sparse_conv2d_vectorized_forward_stride_1
                if stride == 1
                else _spb.sparse_conv2d_vectorized_forward_stride_2
            )
            fn(_np(xp, torch.float32), *idx, val, _np(outp, torch.float32), k, pad)
            # batch-innermost -> NCHW once here: BN & co. on the permuted view copy it twice
            out = outp.permute(3, 0, 1, 2).contiguous()
            saved = x if voo else xp
        ctx.save_for_backward(saved, w_val)
        ctx.w_idx = w_idx
        ctx.k, ctx.pad, ctx.stride, ctx.voo = k, pad, stride, voo
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved, w_val = ctx.saved_tensors
        k, pad, stride, voo = ctx.k, ctx.pad, ctx.stride, ctx.voo
        w_idx = ctx.w_idx
        idx = (_np(w_idx[0], torch.int32), _np(w_idx[1], torch.int16), _np(w_idx[2], torch.uint8), _np(w_idx[3], torch.uint8))
        grad_val = torch.from_numpy(np.zeros(w_val.shape[0], np.float32))  # calloc: no OpenMP fork for a small fill
        grad_in = torch.zeros_like(saved)
        if voo:
            go = grad_out.contiguous()  # guard 3: NCHW-contiguous grad
            fn = (
                _spb.sparse_conv2d_vectorized_backward_over_on_stride_1
                if stride == 1
                else _spb.sparse_conv2d_vectorized_backward_over_on_stride_2
            )
        else:
            go = grad_out.permute(1, 2, 3, 0).contiguous()  # (OC, OH, OW, B)
            fn = (
                _spb.sparse_conv2d_vectorized_backward_stride_1
                if stride == 1
                else _spb.sparse_conv2d_vectorized_backward_stride_2
            )
        # one thread: SparseProp sums the weight gradient with OpenMP reductions and atomics whose order
        # varies from call to call; on one thread the sums, and so every run, are reproducible
        with single_thread():
            fn(
                _np(saved, torch.float32),
                *idx,
                _np(w_val, torch.float32),
                _np(go, torch.float32),
                _np(grad_in, torch.float32),
                _np(grad_val, torch.float32),
                k,
                pad,
            )
        if not voo:
            grad_in = grad_in.permute(3, 0, 1, 2).contiguous()
        return (grad_in if ctx.needs_input_grad[0] else None), grad_val, None, None, None, None, None, None


class _SparseLinearFn(torch.autograd.Function):
    """SparseProp linear (no bias) on a contiguous fp32 (B, M) input."""

    @staticmethod
    def forward(ctx, x, w_val, w_idx, n):
        xt = x.t().contiguous()  # (M, B); a torch copy (guard 1)
        out = torch.zeros(n, x.shape[0])
        _spb.sparse_linear_vectorized_forward(
            _np(xt, torch.float32),
            _np(w_idx[0], torch.int32),
            _np(w_idx[1], torch.int32),
            _np(w_val, torch.float32),
            _np(out, torch.float32),
        )
        ctx.save_for_backward(xt, w_val)
        ctx.w_idx = w_idx
        return out.t()

    @staticmethod
    def backward(ctx, grad_out):
        xt, w_val = ctx.saved_tensors
        go = grad_out.t().contiguous()  # (N, B)
        grad_xt = torch.zeros_like(xt)
        grad_val = torch.from_numpy(np.zeros(w_val.shape[0], np.float32))  # calloc: no OpenMP fork for a small fill
        _spb.sparse_linear_vectorized_backward(
            _np(xt, torch.float32),
            _np(ctx.w_idx[0], torch.int32),
            _np(ctx.w_idx[1], torch.int32),
            _np(w_val, torch.float32),
            _np(go, torch.float32),
            _np(grad_xt, torch.float32),
            _np(grad_val, torch.float32),
        )
        return (grad_xt.t() if ctx.needs_input_grad[0] else None), grad_val, None, None


def sparse_conv2d(x: torch.Tensor, w_val: torch.Tensor, w_idx: tuple, conv: nn.Conv2d, voo: bool) -> torch.Tensor:
    """conv(x) with the structure (w_val, w_idx); guards 1-3 applied; no bias."""
    b = x.shape[0]
    extra = (-b) % BATCH_ALIGN
    if extra:  # guard 2: zero-pad the batch
        x = torch.cat([x, x.new_zeros((extra,) + tuple(x.shape[1:]))])
    out = _SparseConvFn.apply(x, w_val, w_idx, conv.out_channels, conv.kernel_size[0], conv.padding[0], conv.stride[0], voo)
    return out[:b] if extra else out


def sparse_linear(x: torch.Tensor, w_val: torch.Tensor, w_idx: tuple, linear: nn.Linear) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # guard 1: _SparseLinearFn passes a contiguous x.t()
    out = _SparseLinearFn.apply(x2, w_val, w_idx, linear.out_features)
    return out.reshape(*lead, linear.out_features)


# --------------------------------------------------------------------------- the backend
class SparsePropBackend(LayerSwapBackend):
    """ML LinBreg's coarse steps on SparseProp layers; see the module docstring and backends/swap.py.

    Args:
        model: the model (its Conv2d/Linear layers are candidates).
        batch_size: training batch size (the timed comparison runs at this batch).
        in_shape: per-sample input shape (C, H, W), for a dummy forward when no dense step
            has shown the layers' input shapes yet.
        optimizer: the ML LinBreg optimizer; its ``state[w]["support"]`` gives the exact S
            (needed for the ``group`` regularizer, whose S also holds zeros, and for resuming
            inside a cycle). Without it the structure is ``w != 0``.
        force: swap every eligible layer without timing (tests).
        force_mode: ``vectorizing_over_on`` for forced swaps (None: True for stride-1 convs).
        min_speedup: a sparse mode must be this much faster than dense to be chosen.
        warmup, repeats: timed comparison: warm-up calls per candidate, interleaved timed rounds.
        bucket: a timed decision is reused while the layer's nnz stays within this relative
            distance (log scale) of the nnz it was timed at.
    """

    name = "sparseprop"

    def __init__(
        self,
        model: nn.Module,
        batch_size: int | None = None,
        in_shape=None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        force: bool = False,
        force_mode: bool | None = None,
        min_speedup: float = 1.05,
        warmup: int = 1,
        repeats: int = 3,
        bucket: float = 0.1,
        choice_store="machine",
    ):
        self.force_mode = force_mode
        super().__init__(
            model,
            batch_size,
            in_shape,
            optimizer=optimizer,
            force=force,
            min_speedup=min_speedup,
            warmup=warmup,
            repeats=repeats,
            bucket=bucket,
            choice_store=choice_store,
        )

    def _choice_context(self) -> str:
        try:
            release = version("sparseprop")
        except PackageNotFoundError:
            release = "unknown"
        return f"sparseprop {release} min_speedup={self.min_speedup:g}"

    def _reason(self, mod: nn.Module, kind: str) -> str | None:
        return conv_eligible(mod) if kind == "conv" else linear_eligible(mod)

    def _choice_label(self, layer) -> str:
        return "dense" if not layer.swapped else f"sparse(voo={layer.mode})"

    def _build(self, layer, mask: torch.Tensor) -> str | None:
        if layer.kind == "conv":
            idx, w_idx, max_per_oc = _conv_structure(mask)
            layer.nnz = int(idx.numel())
            if max_per_oc > INT16_MAX:  # guard 5
                return f"{max_per_oc} > {INT16_MAX} non-zeros in one output channel"
        else:
            idx, w_idx = _linear_structure(mask)
            layer.nnz = int(idx.numel())
        layer.idx, layer.kernel = idx, w_idx
        return None

    def _forced_mode(self, layer) -> bool:
        if layer.kind == "linear":
            return False
        return bool(self.force_mode if self.force_mode is not None else layer.module.stride[0] == 1)

    def _candidates(self, layer) -> list[bool]:
        if layer.kind == "linear":
            return [False]  # one linear kernel (the mode flag is unused)
        return [False, True]

    # -- timed comparison --------------------------------------------------------------
    def _time_layer(self, layer) -> tuple[bool | None, str, dict]:
        mod = layer.module
        x = torch.randn((self.batch_size,) + layer.in_shape, generator=self._generator).requires_grad_(layer.in_grad)
        w_dense = layer.weight.detach().clone().requires_grad_(True)
        w_val = layer.w_val.detach().clone().requires_grad_(True)
        with torch.no_grad():
            out_shape = (mod._conv_forward(x, w_dense, None) if layer.kind == "conv" else F.linear(x, w_dense)).shape
        grad = torch.randn(out_shape, generator=self._generator)

        def run_dense():
            out = mod._conv_forward(x, w_dense, None) if layer.kind == "conv" else F.linear(x, w_dense)
            out.backward(grad)

        def make_sparse(mode):
            def run():
                if layer.kind == "conv":
                    out = sparse_conv2d(x, w_val, layer.kernel, mod, mode)
                else:
                    out = sparse_linear(x, w_val, layer.kernel, mod)
                out.backward(grad)

            return run

        candidates = {"dense": run_dense}
        for mode in self._candidates(layer):
            candidates[f"voo{int(mode)}"] = make_sparse(mode)

        def reset():
            x.grad = w_dense.grad = w_val.grad = None

        med = timed_rounds(candidates, self.warmup, self.repeats, reset)
        timings = {f"{name}_ms": 1e3 * v for name, v in med.items()}
        sparse = {name: v for name, v in med.items() if name != "dense"}
        best = min(sparse, key=sparse.get)
        speedup = med["dense"] / sparse[best]
        timings["speedup"] = speedup
        if speedup >= self.min_speedup:
            return best == "voo1", f"{speedup:.2f}x faster than dense ({best})", timings
        return None, f"dense is faster (best sparse {best}: {speedup:.2f}x)", timings

    # -- swapping -----------------------------------------------------------------------
    linear_any_rank = True

    def _sparse_forward(self, layer, x):
        if layer.kind == "conv":
            return sparse_conv2d(x, layer.w_val, layer.kernel, layer.module, layer.mode)
        return sparse_linear(x, layer.w_val, layer.kernel, layer.module)
