"""The native backend: ML LinBreg's coarse steps on the project's own sparse CPU kernels.

Like the SparseProp backend, the dense ``weight`` parameters stay the single source of truth (the
optimizer, checkpoints and metrics only see them; the module tree never changes). During a coarse
step:

* every eligible Conv2d / Linear that a timed comparison finds faster runs the sparse kernels on a
  flat value vector ``w_val`` over the support S (fixed for the whole coarse cycle; rebuilt only
  after a fine step); ``after_backward`` scatters ``w_val.grad`` into a per-cycle gradient buffer that
  is zero outside S, ``after_step`` gathers the updated values back;
* every nn.BatchNorm2d runs the native BatchNorm (exactly torch's statistics, train and eval), and
  every conv -> BatchNorm -> [residual add] -> ReLU chain found in the model's torch.fx graph (any
  model: mlbreg's and torchvision's ResNets, VGG, a user's blocks; see fusion.py) runs fused BatchNorm +
  add + ReLU;
* activations stay batch-innermost (CHWB, see ops.py) from the first native layer to the classifier
  (max / average pooling keep the layout: ops.pool_chwb), so no layer pays a layout copy; a dense-kept
  layer reads that layout through torch as a strided view.

Fine steps and evaluation use the plain dense modules (``use_dense``). Guards: only plain
``nn.Conv2d`` (groups 1, dilation 1, square kernel, equal strides, integer symmetric zero padding
below the kernel size) and ``nn.Linear`` with fp32 CPU weights are swapped; anything else stays dense
with the reason in ``summary()``; an input that is neither fp32 nor bf16 on the CPU runs the dense
layer for that call.

``precision="bf16"`` (a run under CPU bf16 autocast): the swapped layers and the native BatchNorm
still compute in fp32 (a bf16 input is widened; fp32 master weights as autocast keeps them), so the
sparse coarse steps are at least as exact as the dense bf16 ones, and the timed choice compares each
layer with the dense layer as the run would execute it (bf16 autocast, channels_last when set).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .. import choice
from ..choice import timed_rounds
from ..swap import LayerSwapBackend
from ..swap_layer import Installed
from . import build, ops
from .fusion import POOLS, GraphPlan, plan_fusions, pool_forward, pool_reason, summary_rows

__all__ = ["NativeBackend", "conv_reason", "linear_reason"]


def conv_reason(conv: nn.Module) -> str | None:
    """None if the native kernels compute this conv (any square kernel, any equal stride), else why not."""
    why = choice.conv_reason(conv, "the native kernels are")
    if why is None and conv.weight.numel() >= 2**31:
        why = "too many weights for int32 indices"
    return why


def linear_reason(linear: nn.Module) -> str | None:
    return choice.linear_reason(linear, "the native kernels are")


def _fp32_cpu(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu"


def _act_cpu(x, dtype: torch.dtype | None) -> bool:
    """A CPU tensor of `dtype` (None: fp32 or bf16)."""
    return (
        isinstance(x, torch.Tensor)
        and x.device.type == "cpu"
        and (x.dtype in (torch.float32, torch.bfloat16) if dtype is None else x.dtype == dtype)
    )


class NativeBackend(LayerSwapBackend):
    """See the module docstring and backends/swap.py (the swapping shared with SparseProp)
    and backends/choice.py (the timed layer choice).

    Args:
        model: its Conv2d / Linear layers are candidates, its BatchNorm2d layers run natively.
        batch_size, in_shape: the timed comparison runs at the training batch size, at input shapes
            seen in dense steps or found by one dummy forward with ``in_shape``.
        optimizer: ML LinBreg's optimizer; ``state[w]["support"]`` gives the exact S.
        force: swap every eligible layer without timing (tests, benchmarks of the kernels).
        min_speedup, warmup, repeats, bucket: the timed choice (one per bin of support sizes of width
            1 + bucket; see backends/choice.py).
        choice_store: the machine's record of timed choices ("machine": the default file, see
            backends/choice_store.py; None: time in this run only).
        native_bn: run BatchNorm2d (and the fused chains, and pooling in the CHWB layout) natively.
        precision, channels_last: how the run's dense layers execute ("fp32" | "bf16" autocast; NHWC
            inputs), the baseline of the timed choice.
    """

    name = "native"
    runs_under_autocast = True
    linear_any_rank = True  # a Linear on (B, ..., F) inputs (a transformer's tokens) runs on rows

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
        native_bn: bool = True,
        precision: str = "fp32",
        channels_last: bool = False,
        choice_store="machine",
    ):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={precision!r}: must be fp32 or bf16")
        self.ext = build.load()
        self.precision, self.channels_last = precision, channels_last
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
        self.native_bn = native_bn
        self.bns = [m for m in model.modules() if type(m) is nn.BatchNorm2d] if native_bn else []
        self.pools = [m for m in model.modules() if type(m) in POOLS and not pool_reason(m)] if native_bn else []
        # conv -> BatchNorm -> [add] -> ReLU chains found in the model's fx graph (fusion.py)
        self.graph = plan_fusions(model, _bn_act_caller(self)) if native_bn else GraphPlan()
        self._pinned = False

    @property
    def fusions(self) -> list:
        """The fused conv -> BatchNorm -> [add] -> ReLU chains (fusion.Fusion), in graph order."""
        return self.graph.fusions

    def fusion_summary(self) -> list[dict]:
        """Beyond ``summary()``'s prunable layers: every BatchNorm2d, pooling layer and untraceable module,
        with what runs natively and why (fusion.summary_rows); empty with ``native_bn=False``."""
        return summary_rows(self.model, self.graph, self.pools, POOLS, set(self.swapped_layers())) if self.native_bn else []

    @property
    def simd_path(self) -> str:
        return self.ext.simd_path()

    def _choice_context(self) -> str:
        return (
            f"native {self.ext.__name__} {self.simd_path} {self.precision} channels_last={int(self.channels_last)} "
            f"min_speedup={self.min_speedup:g}"
        )

    def _reason(self, mod: nn.Module, kind: str) -> str | None:
        return conv_reason(mod) if kind == "conv" else linear_reason(mod)

    def _choice_label(self, layer) -> str:
        return "native" if layer.swapped else "dense"

    def _build(self, layer, mask: torch.Tensor) -> str | None:
        mod = layer.module
        stride, pad = (mod.stride[0], mod.padding[0]) if layer.kind == "conv" else (1, 0)
        st = ops.build_structure(self.ext, mask, stride, pad)
        layer.idx, layer.kernel, layer.nnz = st.idx, st, st.nnz
        return None

    def _forced_mode(self, layer) -> str:
        return "native"

    def _time_layer(self, layer) -> tuple[str | None, str, dict]:
        """Forward + backward of three candidates, interleaved rounds after a warm-up, medians: the dense
        layer as the run's torch layers execute it among dense neighbours ("dense": fp32 or bf16
        autocast, NCHW or channels_last in and out), the dense layer among native neighbours
        ("dense_ctx": it reads their CHWB activations and its output is converted back to CHWB for
        them), and the native layer (CHWB in and out). This layer's own choice compares native with
        "dense"; ``_settle_choices`` then weighs the conversions between neighbours (dense_ctx - dense)
        over the whole chain of layers."""
        mod = layer.module
        shape = (self.batch_size,) + layer.in_shape
        if layer.kind == "linear":  # (B, ..., F) inputs (tokens): one (B * ..., F) matrix
            shape = (math.prod(shape[:-1]), shape[-1])
        x = torch.randn(shape, generator=self._generator)
        if self.channels_last and layer.kind == "conv":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(layer.in_grad)
        bf16 = self.precision == "bf16"
        act = self.act_dtype  # what native neighbours hand on and expect (CHWB)
        if layer.kind == "conv":
            xn = ops.from_chwb(ops.to_chwb(x.detach()).to(act)).requires_grad_(layer.in_grad)
        else:
            xn = x.detach().to(act).t().contiguous().t().requires_grad_(layer.in_grad)
        w_dense = layer.weight.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        w_val = layer.w_val.detach().clone().requires_grad_(True)

        def dense():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return mod._conv_forward(x, w_dense, None) if layer.kind == "conv" else F.linear(x, w_dense)

        def dense_ctx():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = mod._conv_forward(xn, w_dense, None) if layer.kind == "conv" else F.linear(xn, w_dense)
            return ops.from_chwb(ops.to_chwb(out.to(act))) if layer.kind == "conv" else out.to(act)

        def native():
            fn = ops.sparse_conv2d if layer.kind == "conv" else ops.sparse_linear
            return fn(xn, w_val, layer.kernel, bf16)

        with torch.no_grad():
            out = dense()
        grad = torch.randn(out.shape, generator=self._generator)
        if self.channels_last and layer.kind == "conv":
            grad = grad.contiguous(memory_format=torch.channels_last)
        grad_d = grad.to(out.dtype)
        grad_n = ops.from_chwb(ops.to_chwb(grad.to(act))) if layer.kind == "conv" else grad.to(act).t().contiguous().t()
        candidates = {
            "dense": lambda: dense().backward(grad_d),
            "dense_ctx": lambda: dense_ctx().backward(grad_n),
            "native": lambda: native().backward(grad_n),
        }

        def reset():
            x.grad = xn.grad = w_dense.grad = w_val.grad = None

        med = timed_rounds(candidates, self.warmup, self.repeats, reset)
        timings = {f"{name}_ms": 1e3 * v for name, v in med.items()}
        speedup = med["dense"] / med["native"]
        timings["speedup"] = speedup
        if speedup >= self.min_speedup:
            return "native", f"{speedup:.2f}x faster than dense", timings
        return None, f"dense is faster (native {speedup:.2f}x)", timings

    def _settle_choices(self) -> None:
        """Revise the timed choices over the chain of layers (in module order): a dense layer between
        native ones pays the conversions of its input and output (dense_ctx - dense, timed), so the
        choices minimize the chain's total ``sum(own time) + conversions at every dense/native
        boundary`` by dynamic programming, instead of each layer deciding alone. Deterministic given
        the timings (cached and checkpointed), so a resumed run settles the same way."""
        if self.choices.force:
            return
        chain = [
            layer
            for layer in self.layers
            if layer.reason is None
            and layer.kernel is not None
            and {"dense_ms", "dense_ctx_ms", "native_ms"} <= set(layer.timings)
        ]
        if len(chain) < 2:
            return
        own = [{None: lay.timings["dense_ms"], "native": lay.timings["native_ms"] * self.min_speedup} for lay in chain]
        half = [max(0.0, lay.timings["dense_ctx_ms"] - lay.timings["dense_ms"]) / 2 for lay in chain]

        def boundary(i, prev, cur):  # layer i-1 in state prev, layer i in state cur
            if prev == cur:
                return 0.0
            return half[i] if cur is None else half[i - 1]  # the dense side pays its half conversion

        states = (None, "native")
        cost = [{s: own[0][s] for s in states}]
        back = [{}]
        for i in range(1, len(chain)):
            cost.append({})
            back.append({})
            for s in states:
                prev = min(states, key=lambda p: (cost[i - 1][p] + boundary(i, p, s), p is None))
                cost[i][s] = cost[i - 1][prev] + boundary(i, prev, s) + own[i][s]
                back[i][s] = prev
        s = min(states, key=lambda p: (cost[-1][p], p is None))
        for i in range(len(chain) - 1, -1, -1):
            lay = chain[i]
            if lay.mode != s:
                ratio = lay.timings["dense_ms"] / lay.timings["native_ms"]
                lay.why = (
                    f"native {ratio:.2f}x alone; {'native' if s else 'dense'} with its neighbours "
                    f"(conversions {2 * half[i]:.1f} ms)"
                )
                lay.mode = s
            s = back[i].get(s, s)

    # -- swapping -----------------------------------------------------------------------
    def _activate_extra(self) -> None:
        for bn in self.bns:
            bn.forward = Installed(self._bn_forward(bn), bn)
        for pool in self.pools:
            pool.forward = Installed(pool_forward(pool), pool)
        if not self._pinned:
            for _, mod, gm in self.graph.roots:
                mod.forward = Installed(gm.forward, mod)

    def _deactivate_extra(self) -> None:
        for mod in self.bns + self.pools + ([] if self._pinned else [mod for _, mod, _ in self.graph.roots]):
            if "forward" in mod.__dict__:
                del mod.forward

    def pin_graph_roots(self, pinned: bool = True) -> None:
        """Keep the traced modules' forwards installed, coarse step or not; each decides when called: the fused
        graph in a training-mode call during coarse steps, else the module's own forward. For a driver that
        switches phases in a forward pre-hook of the model (loop_hooks.py): nn.Module.__call__ looks the forward
        up before it runs the pre-hooks. ``pinned=False`` removes them (and back to installing when active)."""
        for _, mod, gm in self.graph.roots:
            if "forward" in mod.__dict__:
                del mod.forward
            if pinned or self._active:
                mod.forward = Installed(_pinned_forward(self, mod, gm) if pinned else gm.forward, mod)
        self._pinned = pinned

    @property
    def act_dtype(self) -> torch.dtype:
        """The dtype of the activations (and their gradients) between native layers."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def _sparse_forward(self, layer, x):
        if layer.kind == "conv":
            return ops.sparse_conv2d(x, layer.w_val, layer.kernel, self.precision == "bf16")
        if x.dim() == 2:
            return ops.sparse_linear(x, layer.w_val, layer.kernel, self.precision == "bf16")
        out = ops.sparse_linear(x.reshape(-1, x.shape[-1]), layer.w_val, layer.kernel, self.precision == "bf16")
        return out.reshape(*x.shape[:-1], out.shape[-1])  # (B, ..., F): tokens as rows

    def bn_act(self, bn: nn.Module, x: torch.Tensor, res: torch.Tensor | None = None, relu: bool = False):
        """``act(bn(x) [+ res])``: native when bn is a plain BatchNorm2d and x a CPU batch in the CHWB layout
        and the activation dtype (fp32; bf16 with precision=bf16), i.e. the output of a native layer; the
        statistics and arithmetic are fp32 either way. After a dense-kept layer torch's BatchNorm runs on its
        output: converting it would only be converted back for the next dense layer."""
        if (
            type(bn) is nn.BatchNorm2d
            and _act_cpu(x, self.act_dtype)
            and x.dim() == 4
            and x.shape[0] > 0
            and ops.is_chwb(x)
            and (bn.weight is None or _fp32_cpu(bn.weight))
            and (res is None or (_act_cpu(res, None) and res.shape == x.shape))
            and (not bn.training or x.numel() > x.shape[1])
        ):
            return ops.batch_norm(bn, ops.from_chwb(ops.to_chwb(x)), self.ext, res=res, relu=relu)
        # the module's own forward (ours may be installed on it: calling bn(x) would come back here)
        out = type(bn).forward(bn, x) if "forward" in bn.__dict__ else bn(x)
        if res is not None:
            out = out + res
        return F.relu(out) if relu else out

    def _bn_forward(self, bn: nn.Module):
        dense_forward = type(bn).forward

        def forward(x):
            if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == bn.num_features:
                return self.bn_act(bn, x)
            return dense_forward(bn, x)

        return forward


def _bn_act_caller(backend: NativeBackend):
    """The function the fused graph nodes call (a plain function: torch.fx generates code that calls it), with
    the BatchNorm module, the conv output, the residual (or None) and the ReLU (its module, True for a functional
    one, False for none). A BatchNorm or ReLU module that got forward hooks after the tracing is called as a
    module (its hooks run; the BatchNorm still native), unfused."""

    def bn_act(bn, x, res, relu):
        if (
            bn._forward_hooks
            or bn._forward_pre_hooks
            or (isinstance(relu, nn.Module) and (relu._forward_hooks or relu._forward_pre_hooks))
        ):
            out = bn(x) if res is None else bn(x) + res
            return relu(out) if isinstance(relu, nn.Module) else F.relu(out) if relu else out
        return backend.bn_act(bn, x, res=res, relu=relu is not False)

    return bn_act


def _pinned_forward(backend: NativeBackend, mod: nn.Module, gm):
    plain = type(mod).forward

    def forward(*args, **kwargs):
        if backend._active and mod.training:
            return gm.forward(*args, **kwargs)
        return plain(mod, *args, **kwargs)

    return forward
