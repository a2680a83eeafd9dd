"""The layer choice of the CPU sparse backends (native, SparseProp): which layers may run sparse
(the eligibility reasons), the timed comparison of a layer's candidates, and the per-layer cache of
timed choices. The swapping itself is in backends/swap.py.

A choice timed at nnz0 holds while the layer's nnz stays within a factor 1 + ``bucket`` of nnz0 (no
fixed bucket edges: a support that moves by a few weights never triggers a re-timing); choices are
keyed by layer, input shape, input-requires-grad, batch size and thread count, and checkpointed
(``state_dict``) so a resumed run makes the same choices as the run it continues.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# -- eligibility ------------------------------------------------------------------------


def not_fp32_cpu(w: torch.Tensor, kernels: str) -> str | None:
    if w.dtype != torch.float32 or w.device.type != "cpu":
        return f"weight is {w.dtype} on {w.device}; {kernels} fp32 CPU only"
    return None


def conv_reason(conv: nn.Module, kernels: str, strides: tuple | None = None) -> str | None:
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


def linear_reason(linear: nn.Module, kernels: str) -> str | None:
    if type(linear) is not nn.Linear:
        return "not a plain nn.Linear"
    return not_fp32_cpu(linear.weight, kernels)


# -- the timed comparison ----------------------------------------------------------------


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


# -- the per-layer choice cache ----------------------------------------------------------

Entry = tuple  # (nnz, mode, why, timings): mode None means dense


class LayerChoice:
    """The timed choices of one backend: ``decisions`` maps a key to the entries timed under it.

    ``force``: every eligible layer gets the backend's forced mode, untimed. ``bucket``: a choice is
    reused while the layer's nnz stays within a factor 1 + bucket of the nnz it was timed at.
    ``timing_seconds`` accumulates the time spent in timed comparisons."""

    def __init__(self, force: bool = False, bucket: float = 0.1):
        self.force = force
        self.bucket = bucket
        self.decisions: dict[tuple, list[Entry]] = {}   # key -> [(nnz, mode, why, timings)]
        self.timing_seconds = 0.0

    def choose(self, layer, batch_size: int | None, forced_mode: Callable[[Any], Any],
               time_layer: Callable[[Any], tuple[Any, str, dict]]) -> tuple[Any, str]:
        """(mode, why) for a built `layer` (a swap.SwapLayer; its ``timings`` are set): forced, cached,
        or timed now by ``time_layer(layer)`` -> (mode, why, timings)."""
        if self.force:
            return forced_mode(layer), "forced"
        if layer.in_shape is None or not batch_size:
            return None, "input shape unknown (no dense step seen, no in_shape)"
        key = (layer.name, layer.in_shape, layer.in_grad, batch_size, torch.get_num_threads())
        _, mode, why, timings = self._entry(key, layer.nnz, lambda: time_layer(layer))
        layer.timings = timings
        return mode, why

    def _entry(self, key: tuple, nnz: int, time_now: Callable[[], tuple]) -> Entry:
        """The cached entry nearest to `nnz` (log scale) within the bucket, else a newly timed one."""
        entries = self.decisions.setdefault(key, [])
        width = math.log1p(self.bucket)
        near = [e for e in entries if abs(math.log(nnz / e[0])) <= width]
        if near:
            return min(near, key=lambda e: abs(math.log(nnz / e[0])))
        t0 = time.perf_counter()
        entry = (nnz, *time_now())
        self.timing_seconds += time.perf_counter() - t0
        entries.append(entry)
        return entry

    # -- checkpoints: the format of LayerSwapBackend.state_dict ------------------------
    def state_dict(self, backend: str) -> dict:
        return dict(backend=backend, decisions={k: list(v) for k, v in self.decisions.items()})

    def load_state_dict(self, state: dict, backend: str) -> None:
        if state.get("backend") == backend:     # another backend's choices mean nothing here
            self.decisions = {tuple(k): list(v) for k, v in state["decisions"].items()}
