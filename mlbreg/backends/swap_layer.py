"""One prunable layer of the CPU sparse backends (``SwapLayer``): its sparse structure, values and value
gradient, the choice made for it, and the two context helpers the swapping needs. See swap.py."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .memory_order import memory_flat, memory_index


@contextmanager
def single_thread():
    """Many small index ops: no OpenMP fork/join per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # older torch
        return torch.is_autocast_cpu_enabled()


class Installed:
    """A hook or instance ``forward`` that a backend installs on a module (``fn``). A copy or pickle of the module
    (``copy.deepcopy``, ``torch.save(model)``) gets a plain stand-in instead (``Plain``: a hook that does nothing,
    the class's own forward): a copied model never runs on, or writes into, the original's sparse layers."""

    def __init__(self, fn, module=None):
        self.fn, self.module = fn, module

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __reduce__(self):
        return (Plain, (self.module,))


class Plain:
    """What a copy gets for an ``Installed``: its module's class forward (``module`` set), else a no-op hook."""

    def __init__(self, module=None):
        self.module = module

    def __call__(self, *args, **kwargs):
        return None if self.module is None else type(self.module).forward(self.module, *args, **kwargs)


@dataclass
class SwapLayer:
    """One prunable layer and, while a structure is built, its sparse form."""

    name: str
    module: nn.Module
    kind: str  # "conv" | "linear"
    reason: str | None  # static guard failure (None: eligible)
    in_shape: tuple | None = None  # per-sample input shape seen in a forward
    in_grad: bool = True  # does the layer's input require grad in training?
    idx: torch.Tensor | None = None  # int64 flat positions of the structure in the dense weight
    mem_idx: torch.Tensor | None = None  # the same positions in the weight's memory order (channels_last)
    weight_strides: tuple = ()  # the weight strides mem_idx was computed for
    w_val: torch.Tensor | None = None  # fp32 values on idx, a leaf that gets .grad
    kernel: Any = None  # the backend's structure for its kernels
    nnz: int = 0
    grad_buf: torch.Tensor | None = None  # dense weight gradient buffer of this coarse phase
    buf_version: int = -1  # grad_buf._version after its last scatter
    mode: Any = None  # None: dense; else the backend's sparse mode
    why: str = ""  # why this choice (for reports)
    timings: dict = field(default_factory=dict)
    choice_key: str = ""  # the LayerChoice key of the choice (choice.py)
    decided_by: str = ""  # what decided it: forced, the machine's record, ...

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def swapped(self) -> bool:
        return self.mode is not None

    def clear(self) -> None:
        self.mode, self.idx, self.w_val, self.kernel, self.grad_buf, self.timings = None, None, None, None, None, {}
        self.mem_idx, self.choice_key, self.decided_by = None, "", ""

    def accepts(self, x, any_rank: bool, under_autocast: bool = False) -> bool:
        """An fp32 CPU input of the expected shape outside autocast (or, with `under_autocast`, an fp32 or
        bf16 one under CPU autocast); anything else runs the dense layer."""
        if not (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.numel() > 0):
            return False
        if autocast_on():
            if not (under_autocast and x.dtype in (torch.float32, torch.bfloat16)):
                return False
        elif x.dtype != torch.float32:
            return False
        mod = self.module
        if self.kind == "conv":
            return x.dim() == 4 and x.shape[1] == mod.in_channels
        return (x.dim() >= 1 if any_rank else x.dim() == 2) and x.shape[-1] == mod.in_features

    def take_grad(self, *_) -> None:
        """The value gradient (if this step used the layer) into the dense ``weight.grad``; also the hook that
        runs when backward has accumulated ``w_val.grad`` (swap.py)."""
        if not self.swapped or self.w_val.grad is None:
            return  # dense, or not used in this step
        g = self.w_val.grad
        self.w_val.grad = None
        w = self.weight
        if w.grad is None:  # the usual case: the dense weight took no part
            with single_thread():
                if self.grad_buf is None:
                    self.grad_buf = torch.zeros(w.shape, dtype=w.dtype)
                elif self.grad_buf._version != self.buf_version:
                    self.grad_buf.zero_()  # written since (a dense gradient added in place): zero outside S again
                self.grad_buf.view(-1).scatter_(0, self.idx, g)
            self.buf_version = self.grad_buf._version
            w.grad = self.grad_buf
        else:  # a dense fallback ran too, or grads were not reset: accumulate
            memory_flat(w.grad).index_add_(0, memory_index(w.grad, self.idx), g)

    def structure_moved(self) -> bool:
        """Does a non-zero of the dense weight lie outside the structure (weights changed since the build)?"""
        w = self.weight.detach().reshape(-1)
        with single_thread():
            return int(torch.count_nonzero(w)) != int(torch.count_nonzero(w.index_select(0, self.idx)))

    def summary_row(self, choice: str) -> dict[str, Any]:
        numel = self.weight.numel()
        return dict(
            layer=self.name,
            kind=self.kind,
            in_shape=self.in_shape,
            nnz=self.nnz,
            density=self.nnz / numel if numel else 0.0,
            choice=choice,
            why=self.reason or self.why,
            decided_by=self.decided_by or "ineligible",
            **self.timings,
        )
