"""Sparse conv / linear and fused BatchNorm as autograd functions over the native kernels.

Layout: activations travel between native layers as CHWB (batch innermost): a contiguous (C, H, W, B)
tensor that torch sees as the NCHW view ``t.permute(3, 0, 1, 2)``. Elementwise torch ops (ReLU, add)
keep that layout, a native layer reads it without a copy, and a layer that gets any other layout
copies it once (``to_chwb``). Every kernel checks shapes, dtypes and contiguity itself, so a wrong
layout raises instead of computing garbage.

Sparse structure (``build_structure``): the non-zeros of each output channel, bucketed by kernel
position (u, v) and ordered by input channel inside a bucket; ``idx`` maps them to flat positions of
the dense weight (the values are ``weight.view(-1)[idx]``). A stride-1 conv also gets the transposed,
flipped structure for its input gradient (a gather, like the forward); a strided conv's input gradient
is a gather over the transposed structure, by parity class of the input position.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F


class OpTimes:
    """Seconds per kind of native work ("conv" kernels, "bn" fused BatchNorm, "layout" copies into CHWB),
    accumulated while ``enabled`` (benchmarks); off by default (one attribute read per call)."""

    enabled = False
    seconds: dict = defaultdict(float)

    @classmethod
    def reset(cls) -> None:
        cls.seconds = defaultdict(float)


def _timed(kind: str, fn, *args):
    if not OpTimes.enabled:
        return fn(*args)
    t = time.perf_counter()
    out = fn(*args)
    OpTimes.seconds[kind] += time.perf_counter() - t
    return out


def is_chwb(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.permute(1, 2, 3, 0).is_contiguous()


def to_chwb(x: torch.Tensor) -> torch.Tensor:
    """The physical (C, H, W, B) tensor of an NCHW-shaped tensor (a copy only when it is not CHWB)."""
    return _timed("layout", torch.Tensor.contiguous, x.permute(1, 2, 3, 0))


def from_chwb(t: torch.Tensor) -> torch.Tensor:
    return t.permute(3, 0, 1, 2)


def pool_chwb(forward, pool, x: torch.Tensor) -> torch.Tensor:
    """``forward(pool, x)`` (a 2-D pooling module's forward) on a CHWB batch, output CHWB: with batch and channels
    swapped, a CHWB tensor is a channels_last (C, B, H, W) tensor, which torch's CPU pooling reads and writes in
    that layout (pooling is per sample and channel, so the swap changes nothing); pooling the (B, C, H, W) view
    directly is 12x slower for a ResNet's stem max-pool (docs/own-model.md) and needs a copy back for the next
    native layer."""
    return forward(pool, x.transpose(0, 1)).transpose(0, 1)


@dataclass
class Structure:
    """The fixed support of one conv (or linear, as a 1x1 conv on a 1x1 image) for the kernels."""

    ext: Any
    c_out: int
    c_in: int
    k: int
    stride: int
    pad: int
    idx: torch.Tensor  # int64 (nnz,) flat positions in the dense weight, kernel order
    bptr: torch.Tensor  # int32 (c_out*k*k + 1,) bucket starts
    chan: torch.Tensor  # int32 (nnz,) input channel per non-zero
    t_perm: torch.Tensor | None = None  # kernel-order index of each transposed non-zero
    t_bptr: torch.Tensor | None = None
    t_chan: torch.Tensor | None = None

    @property
    def nnz(self) -> int:
        return int(self.idx.numel())


def _buckets(group: torch.Tensor, n: int) -> torch.Tensor:
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(group, minlength=n), 0, out=ptr[1:])
    return ptr.to(torch.int32)


def build_structure(ext, mask: torch.Tensor, stride: int = 1, pad: int = 0) -> Structure:
    """Structure of a boolean (C_out, C_in, K, K) conv mask or (N, M) linear mask."""
    if mask.dim() == 2:
        mask = mask[:, :, None, None]
    c_out, c_in, k, k2 = mask.shape
    assert k == k2, mask.shape
    if mask.numel() >= 2**31:
        raise ValueError(f"weight with {mask.numel()} entries is too large for int32 indices")
    nz = mask.nonzero()
    co, ci, u, v = nz.unbind(1)
    flat = ((co * c_in + ci) * k + u) * k + v
    order = torch.argsort(((co * k + u) * k + v) * c_in + ci)
    bucket = ((co * k + u) * k + v)[order]
    st = Structure(
        ext,
        c_out,
        c_in,
        k,
        stride,
        pad,
        flat[order].contiguous(),
        _buckets(bucket, c_out * k * k),
        ci[order].to(torch.int32).contiguous(),
    )
    # transposed structure for the input gradient: per input channel, buckets of output channels;
    # flipped kernel positions for stride 1 (the gradient is then a stride-1 conv of the output
    # gradient), as they are for a strided conv (the transposed gather reads them directly)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    ut, vt = (k - 1 - u, k - 1 - v) if stride == 1 else (u, v)
    t_order = torch.argsort(((ci * k + ut) * k + vt) * c_out + co)
    st.t_perm = inverse[t_order].contiguous()
    st.t_bptr = _buckets(((ci * k + ut) * k + vt)[t_order], c_in * k * k)
    st.t_chan = co[t_order].to(torch.int32).contiguous()
    return st


def _input_grad(st: Structure, g: torch.Tensor, val: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """The input gradient (CHWB) in `dtype` (the forward input's: float32 or bfloat16)."""
    t_val = val.index_select(0, st.t_perm)
    if st.stride == 1:  # a stride-1 conv of the output gradient with the flipped, transposed kernel
        pad = st.k - 1 - st.pad
        gp = _timed("layout", st.ext.pad_chwb, g, pad)
        return _timed(
            "conv",
            st.ext.conv_gather_padded,
            gp,
            g.shape[1] + 2 * pad,
            g.shape[2] + 2 * pad,
            g.shape[3],
            st.t_bptr,
            st.t_chan,
            t_val,
            st.c_in,
            st.k,
            1,
            dtype == torch.bfloat16,
        )
    out = _timed("conv", st.ext.conv_tgather, g, st.t_bptr, st.t_chan, t_val, st.c_in, h, w, st.k, st.stride, st.pad)
    return out if out.dtype == dtype else from_chwb(to_chwb(out).to(dtype))


class SparseConvFn(torch.autograd.Function):
    """y = conv2d(x, W) with W given by its values on the structure; x any layout, float32 or bfloat16;
    y CHWB, bfloat16 when `out_bf16` (precision=bf16: activations stored in bf16, computed in fp32).

    The kernels read a zero-padded fp32 copy of x (``pad_chwb``: no border cases, a channel stride that
    keeps the channels' windows out of each other's cache sets, bf16 widened once); the weight gradient
    reuses that copy. The input gradient comes back in x's dtype."""

    @staticmethod
    def forward(ctx, x, w_val, st: Structure, out_bf16: bool = False):
        xc = to_chwb(x)
        val = w_val.detach().contiguous()
        xp = _timed("layout", st.ext.pad_chwb, xc, st.pad)
        hp, wp = xc.shape[1] + 2 * st.pad, xc.shape[2] + 2 * st.pad
        out = _timed(
            "conv",
            st.ext.conv_gather_padded,
            xp,
            hp,
            wp,
            xc.shape[3],
            st.bptr,
            st.chan,
            val,
            st.c_out,
            st.k,
            st.stride,
            out_bf16,
        )
        ctx.st, ctx.hw, ctx.padded_hw, ctx.in_dtype = st, (x.shape[2], x.shape[3]), (hp, wp), x.dtype
        ctx.save_for_backward(xp if w_val.requires_grad else None, val)
        return out

    @staticmethod
    def backward(ctx, grad):
        xp, val = ctx.saved_tensors
        st = ctx.st
        g = to_chwb(grad)
        dx = _input_grad(st, g, val, *ctx.hw, ctx.in_dtype) if ctx.needs_input_grad[0] else None
        dval = (
            _timed("conv", st.ext.conv_sddmm_padded, g, xp, *ctx.padded_hw, st.bptr, st.chan, st.k, st.stride)
            if ctx.needs_input_grad[1]
            else None
        )
        return dx, dval, None, None


def sparse_conv2d(x, w_val, st: Structure, out_bf16: bool = False):
    return SparseConvFn.apply(x, w_val, st, out_bf16)


def sparse_linear(x, w_val, st: Structure, out_bf16: bool = False):
    """A linear layer is a 1x1 conv on a 1x1 image: (B, F) -> (B, F, 1, 1) is a view, and so is the
    way back; a (B, F) input with strides (1, B) (a CHWB pool + flatten) needs no copy."""
    return SparseConvFn.apply(x[:, :, None, None], w_val, st, out_bf16).flatten(1)


class BatchNormFn(torch.autograd.Function):
    """act(batch_norm(x) [+ res]) on a CHWB x (float32 or bfloat16; the output in x's dtype, the arithmetic
    fp32); statistics exactly as torch's BatchNorm2d (biased batch variance to normalize, unbiased for
    the running estimate)."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, res, ext, relu: bool, training: bool, running_mean, running_var, factor: float, eps: float
    ):
        c = x.shape[1]
        xc = x.permute(1, 2, 3, 0)
        assert xc.is_contiguous(), "BatchNormFn needs a CHWB input"
        gamma = weight.detach() if weight is not None else torch.ones(c)
        beta = bias.detach() if bias is not None else torch.zeros(c)
        rc = to_chwb(res) if res is not None else None
        if training:
            y, mean, var = _timed("bn", ext.bn_forward, xc, gamma, beta, rc, None, None, eps, relu)
            if running_mean is not None:
                n = xc.numel() // max(c, 1)
                with torch.no_grad():
                    running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
                    unbiased = var * (n / (n - 1)) if n > 1 else var
                    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
        else:
            y, mean, var = _timed("bn", ext.bn_forward, xc, gamma, beta, rc, running_mean, running_var, eps, relu)
        ctx.ext, ctx.relu, ctx.training, ctx.eps, ctx.has_res = ext, relu, training, eps, res is not None
        ctx.res_dtype = res.dtype if res is not None else None
        ctx.affine = (weight is not None, bias is not None)
        # y only for the ReLU mask (saving it otherwise would forbid an in-place op after the layer)
        ctx.save_for_backward(xc, y if relu else None, gamma, mean, var)
        return y

    @staticmethod
    def backward(ctx, grad):
        xc, y, gamma, mean, var = ctx.saved_tensors
        g = to_chwb(grad)
        dx, dgamma, dbeta, dres = _timed(
            "bn",
            ctx.ext.bn_backward,
            g,
            xc,
            y.permute(1, 2, 3, 0) if ctx.relu else xc,
            gamma,
            mean,
            var,
            ctx.eps,
            ctx.relu,
            ctx.training,
            ctx.has_res,
        )
        if ctx.has_res:
            dres = dres if ctx.relu else from_chwb(g)
            if dres.dtype != ctx.res_dtype:
                dres = from_chwb(to_chwb(dres).to(ctx.res_dtype))
        else:
            dres = None
        return (
            dx,
            dgamma if ctx.affine[0] else None,
            dbeta if ctx.affine[1] else None,
            dres,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def batch_norm(
    bn: torch.nn.BatchNorm2d, x: torch.Tensor, ext, res: torch.Tensor | None = None, relu: bool = False
) -> torch.Tensor:
    """``act(bn(x) [+ res])`` with the module's statistics handled as nn.BatchNorm2d.forward does."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    rm = bn.running_mean if not bn.training or bn.track_running_stats else None
    rv = bn.running_var if not bn.training or bn.track_running_stats else None
    return BatchNormFn.apply(x, bn.weight, bn.bias, res, ext, relu, use_batch, rm, rv, factor, bn.eps)


# --------------------------------------------------------------------------- self-check helpers
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_conv_error(ext, x64: torch.Tensor, w: torch.Tensor, stride: int, pad: int) -> float:
    """Largest relative error (output, input gradient, weight gradient on the support) of the sparse
    conv against float64 autograd."""
    st = build_structure(ext, w != 0, stride, pad)
    x = x64.float().requires_grad_(True)
    w_val = w.reshape(-1)[st.idx].clone().requires_grad_(True)
    out = sparse_conv2d(x, w_val, st)
    gen = torch.Generator().manual_seed(7)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad.float())
    xr = x64.clone().requires_grad_(True)
    wr = w.double().clone().requires_grad_(True)
    ref = F.conv2d(xr, wr, stride=stride, padding=pad)
    ref.backward(grad)
    return max(_rel(out, ref), _rel(x.grad, xr.grad), _rel(w_val.grad, wr.grad.reshape(-1)[st.idx]))


def max_bn_error(ext, gen: torch.Generator) -> float:
    x = torch.randn(3, 5, 4, 11, generator=gen)  # (C, H, W, B) physical
    r = torch.randn(3, 5, 4, 11, generator=gen)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ref_bn = torch.nn.BatchNorm2d(3)
    ref_bn.load_state_dict(bn.state_dict())
    xa, ra = from_chwb(x).requires_grad_(True), from_chwb(r).requires_grad_(True)
    xb, rb = from_chwb(x).contiguous().requires_grad_(True), from_chwb(r).contiguous().requires_grad_(True)
    out = batch_norm(bn, xa, ext, res=ra, relu=True)
    ref = torch.relu(ref_bn(xb) + rb)
    g = torch.randn(out.shape, generator=gen)
    out.backward(g)
    ref.backward(g)
    return max(
        _rel(out, ref),
        _rel(xa.grad, xb.grad),
        _rel(ra.grad, rb.grad),
        _rel(bn.weight.grad, ref_bn.weight.grad),
        _rel(bn.running_var, ref_bn.running_var),
    )
