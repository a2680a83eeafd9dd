"""The layer choice of the CPU sparse backends (native, SparseProp): which layers may run sparse
(the eligibility reasons), the timed comparison of a layer's candidates, and the per-layer cache of
timed choices. The swapping itself is in backends/swap.py.

Choices are keyed by the backend's context, thread count, batch size, layer shape and a fixed bin of
support sizes, read from the machine's record of timed choices (choice_store.py) so that two launches
of one command choose alike, and checkpointed (``state_dict``) so a resumed run makes the same choices
as the run it continues.
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
    then `repeats` interleaved rounds (a load change hits all candidates alike), every candidate in every
    round, so one disturbed round cannot decide (the machine's record keeps a decision for good); medians.
    `reset()` runs after every call."""
    candidates = dict(candidates)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.enable_grad():
        for _ in range(warmup):
            for fn in candidates.values():
                fn()
                reset()
        for _ in range(repeats):
            for name, fn in list(candidates.items()):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
                reset()
    return {name: statistics.median(v) for name, v in times.items()}


# -- the per-layer choice cache ----------------------------------------------------------


def layer_signature(layer) -> str:
    """What the timing of a layer depends on besides the support size: its shape and its input's."""
    mod = layer.module
    if layer.kind == "conv":
        k, s, p = mod.kernel_size[0], mod.stride[0], mod.padding[0]
        head = f"conv {mod.in_channels}->{mod.out_channels} {k}x{k} s{s} p{p}"
    else:
        head = f"linear {mod.in_features}->{mod.out_features}"
    return f"{head} in {'x'.join(map(str, layer.in_shape))} grad={int(layer.in_grad)}"


class LayerChoice:
    """The timed choices of one backend: ``decisions`` maps a key to its entry
    ``dict(nnz=, mode=, why=, timings=)`` (mode None means dense; nnz: the support size it was timed at).

    A key names the backend's context (which kernels, precision, memory format), the thread count, the
    batch size, the layer's shape and its bin of support sizes: bins are a fixed log-scale grid of width
    ``1 + bucket``, so a support that moves by a few weights keeps its choice and the bin of a support
    size never depends on the run's history. Lookup order: this run's decisions (made earlier or
    restored from its checkpoint), then the machine's record (``store``, see choice_store.py), then a
    timed comparison now (written to the record). ``force``: every eligible layer gets the backend's
    forced mode, untimed. ``timing_seconds`` accumulates the time spent timing."""

    def __init__(self, force: bool = False, bucket: float = 0.1, store=None, context: str = ""):
        self.force = force
        self.bucket = bucket
        self.store = store
        self.context = context
        self.decisions: dict[str, dict] = {}
        self.source: dict[str, str] = {}  # key -> what decided it (reported in env.json)
        self.timing_seconds = 0.0

    def key(self, layer, batch_size: int) -> str:
        nnz_bin = math.floor(math.log(max(layer.nnz, 1)) / math.log1p(self.bucket))
        return (
            f"{self.context} | threads {torch.get_num_threads()} | batch {batch_size} | "
            f"{layer_signature(layer)} | nnz bin {nnz_bin}"
        )

    def choose(
        self,
        layer,
        batch_size: int | None,
        forced_mode: Callable[[Any], Any],
        time_layer: Callable[[Any], tuple[Any, str, dict]],
    ) -> tuple[Any, str]:
        """(mode, why) for a built `layer` (a swap_layer.SwapLayer; sets its ``timings`` and ``decided_by``):
        forced, from this run, from the machine's record, or timed now by ``time_layer(layer)`` ->
        (mode, why, timings)."""
        if self.force:
            layer.decided_by = "forced"
            return forced_mode(layer), "forced"
        if layer.in_shape is None or not batch_size:
            layer.decided_by = "no timing possible"
            return None, "input shape unknown (no dense step seen, no in_shape)"
        key = self.key(layer, batch_size)
        if key not in self.decisions:
            self.decisions[key], self.source[key] = self._lookup(key, layer, time_layer)
        entry = self.decisions[key]
        layer.timings, layer.choice_key, layer.decided_by = dict(entry["timings"]), key, self.source[key]
        return entry["mode"], entry["why"]

    def _lookup(self, key: str, layer, time_layer) -> tuple[dict, str]:
        def time_now() -> dict:
            t0 = time.perf_counter()
            mode, why, timings = time_layer(layer)
            self.timing_seconds += time.perf_counter() - t0
            return dict(nnz=layer.nnz, mode=mode, why=why, timings=timings)

        if self.store is None:
            return time_now(), "timed in this run (no machine record)"
        entry, timed = self.store.get_or_time(key, time_now)
        return entry, (
            f"timed in this run, recorded in {self.store.path}" if timed else f"the machine's record {self.store.path}"
        )

    # -- checkpoints: the format of LayerSwapBackend.state_dict ------------------------
    FORMAT = 2

    def state_dict(self, backend: str) -> dict:
        return dict(backend=backend, format=self.FORMAT, decisions={k: dict(v) for k, v in self.decisions.items()})

    def load_state_dict(self, state: dict, backend: str) -> None:
        """Restore a run's decisions; another backend's (they mean nothing here) and an older format's
        (keyed by layer name; timed again) are ignored."""
        if state.get("backend") == backend and state.get("format") == self.FORMAT:
            self.decisions = {k: dict(v) for k, v in state["decisions"].items()}
            self.source = {k: "restored from the run's checkpoint" for k in self.decisions}
