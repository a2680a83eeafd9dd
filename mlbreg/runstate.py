"""The small pieces of state one training carries between steps, epochs and restarts.

- `EpochMeter`: the running sums of one epoch (loss, correct, seen, the first
  non-finite step: device tensors, read once per epoch) and its timers, named as the
  metrics.csv columns (forward_s, backward_s, optimizer_s, swap_s, epoch_s). A
  checkpoint taken inside an epoch holds them as its `partial_epoch` dict.
- `StopGuard`: SIGTERM / SIGINT / SIGUSR2 set a flag; the loop checkpoints after the
  current step and exits. Under DDP the ranks agree every `stop_check_every` steps.
- `RngState`: the python, numpy, torch and CUDA generators (a checkpoint's `rng` dict).
"""

from __future__ import annotations

import random
import signal
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from .failures import is_ours
from .labels import STEP_TIMERS

__all__ = ["EpochMeter", "RngState", "STOP_SIGNALS", "StopGuard", "TIMERS", "hand_on"]

TIMERS = tuple(col for col, _ in STEP_TIMERS)


class EpochMeter:
    """One epoch's sums and timers, started fresh or from a checkpoint's `partial_epoch`."""

    def __init__(self, device: torch.device, partial: dict[str, Any] | None = None, keep_sums: bool = True):
        p = dict(partial or {})
        if not keep_sums:  # global sums: rank 0 carries them on resume, the others restart at 0
            p.update(loss=0.0, correct=0)
        self.loss_sum = torch.tensor(p.get("loss", 0.0), dtype=torch.float64, device=device)
        self.correct = torch.tensor(p.get("correct", 0), dtype=torch.long, device=device)
        self.bad_step = torch.tensor(p.get("bad_step", -1), dtype=torch.long, device=device)
        self.seen = p.get("seen", 0)
        self.times = {k: p.get(k, 0.0) for k in TIMERS}
        self.started = time.perf_counter() - p.get("epoch_s", 0.0)
        self.epoch_s = None

    def time(self, **seconds: float) -> None:
        for name, s in seconds.items():
            self.times[name] += s

    def account(self, loss: torch.Tensor, out: torch.Tensor, y_local: torch.Tensor, batch: int, step: int) -> None:
        """One step's loss and predictions on this rank's shard; `batch`: the global batch size."""
        loss = loss.detach()
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss), step, self.bad_step)
        self.loss_sum += loss.double() * y_local.numel()
        self.correct += (out.detach().argmax(1) == y_local).sum()
        self.seen += batch

    def partial_epoch(self, ctx) -> dict[str, Any]:
        """The checkpoint's `partial_epoch` dict: the global sums so far and the timers."""
        return dict(
            loss=ctx.all_sum(self.loss_sum.clone()).item(),
            correct=ctx.all_sum(self.correct.clone()).item(),
            seen=self.seen,
            **self.times,
            epoch_s=time.perf_counter() - self.started,
            bad_step=int(self.bad_step),
        )

    def finish(self, ctx) -> None:
        """End of the epoch's steps: sum over the ranks, stop the wall clock."""
        self.loss_sum, self.correct = ctx.all_sum(self.loss_sum), ctx.all_sum(self.correct)
        self.epoch_s = time.perf_counter() - self.started

    def train_loss(self) -> float:
        return self.loss_sum.item() / self.seen

    def train_acc_pct(self) -> float:
        return 100.0 * self.correct.item() / self.seen


# SIGUSR2: submitit's (and Slurm's `--signal=USR2@...`) warning that the job's time is up
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR2") if hasattr(signal, name))


class StopGuard:
    """Catches the stop signals (while `catching()`) and says when the loop must stop."""

    def __init__(self, ctx, device: torch.device, check_every: int):
        self.ctx, self.device, self.check_every = ctx, device, check_every
        self.signal = None

    def __call__(self, signum, frame):
        self.signal = signum

    @contextmanager
    def catching(self):
        previous = {}
        for sig in STOP_SIGNALS:
            try:
                previous[sig] = signal.signal(sig, self)
            except ValueError:  # not the main thread: signals stay with whoever runs us
                pass
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def after_step(self, step: int) -> bool:
        """Stop after this step? Under DDP every rank must stop at the same step: they agree
        every `check_every` steps."""
        if not self.ctx.enabled:
            return self.signal is not None
        if step % self.check_every:
            return False
        return self.any_rank()

    def any_rank(self) -> bool:
        return self.ctx.any(self.signal is not None, self.device)


def hand_on(signum) -> None:
    """After the checkpoint, give a stop signal to the handler that owned it before the
    run (submitit's SIGUSR2 handler requeues the Slurm job and exits). Only a Python
    handler gets it: with the default action the signal would kill the process instead
    of the clean exit with 128 + signal."""
    if signum is None or signum not in STOP_SIGNALS or signum == signal.SIGINT:
        return
    try:
        handler = signal.getsignal(signum)
    except ValueError:
        return
    if callable(handler) and not is_ours(handler):  # not mlbreg's own "stopped before training" handler
        signal.raise_signal(signum)


class RngState:
    """Capture and restore every generator a run draws from (format: the checkpoint's `rng`).

    Only tensors and plain values, so that a checkpoint loads tensors-only: python's state is
    a tuple of ints; numpy's legacy tuple holds its key as a list of ints instead of an array."""

    @staticmethod
    def capture() -> dict[str, Any]:
        name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
        numpy_state = (str(name), key.tolist(), int(pos), int(has_gauss), float(gauss))
        state = dict(python=random.getstate(), numpy=numpy_state, torch=torch.get_rng_state())
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def restore(state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        name, key, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
