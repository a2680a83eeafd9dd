"""One training run, start to finish: `train(cfg, run_dir)`.

Data flows one way: config -> (data, model, method) -> loop -> rows -> files.

- mlbreg.build: the parts (data, model, method, loaders, scheduler) and the evaluation;
- mlbreg.loop: the `Trainer` (steps, epochs, rows, checkpoints, resume);
- mlbreg.runstate: the epoch meter, the stop guard and the RNG state it carries.

This module decides whether a run runs at all (a finished run is kept), sets up the
device and DDP, and hands a stop signal on once the run has checkpointed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from . import __version__, distributed
from .build import resolve_device
from .config import run_name, unused_notes, validate
from .cpu_alloc import keep_freed_memory
from .loop import Trainer
from .rundir import RunDir
from .runlock import RunLock, describe
from .runstate import hand_on
from .status import Status

__all__ = ["finished_status", "train"]


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run (or resume, or skip if finished or run by another launcher) one training; returns
    the run's final status dict (`skipped`: nothing was trained; `busy`: the live holder of
    the run directory's lock, see mlbreg.runlock)."""
    validate(cfg)
    for note in unused_notes(cfg):
        print(f"mlbreg: note: {note}", file=sys.stderr)
    run = RunDir(run_dir)
    # rank 0 of a DDP job holds the lock for all ranks (they share the run directory)
    lock = RunLock(run.path) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        holder = lock.acquire(wait=bool(cfg.get("wait_for_lock"))) if lock else None
    except OSError:
        kept = finished_status(cfg, run.path)
        if kept is None:
            raise
        return dict(kept, skipped=True)  # finished, on a read-only disk: nothing to lock, nothing to write
    if holder is not None:
        message = f"already running on {describe(holder)}; skipped"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(f"{run.path}: {message}")  # the other ranks must not wait for this one
        return dict(status="busy", skipped=True, busy=holder, message=message)
    try:
        if lock and lock.taken_over:
            print(
                f"mlbreg: note: {run.path}: took over the lock left by {describe(lock.taken_over)}, which no longer holds it",
                file=sys.stderr,
            )
        return _train_locked(cfg, run)
    finally:
        if lock:
            lock.release()


def finished_status(cfg: DictConfig, run_dir: str | Path, previous: dict[str, Any] | None = None) -> dict | None:
    """The status of the finished run in `run_dir` that a launch of `cfg` keeps instead of
    training it again (resume=true, same run key: name and mlbreg version), else None.
    `previous`: the status already read (else status.json is read; an unreadable one: None)."""
    previous = RunDir(run_dir).read_status() if previous is None else previous
    if (
        previous
        and cfg.resume
        and previous.get("status") == Status.FINISHED
        and previous.get("run_key") == f"{__version__}:{run_name(cfg)}"
    ):
        return previous
    return None


def _train_locked(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    name = run_name(cfg)
    run_key = f"{__version__}:{name}"
    previous = run.read_status(strict=True)
    if finished_status(cfg, run.path, previous):
        return dict(previous, skipped=True)  # a finished run is kept, not recomputed
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    device = distributed.local_device(resolve_device(cfg.device))
    if device.type == "cpu":
        keep_freed_memory()  # CPU steps reuse heap memory instead of page-faulting fresh mappings
    ctx = distributed.init(cfg.distributed, device)
    if not cfg.resume and ctx.is_main:
        run.clear()
    ctx.barrier()
    outcome = Trainer(cfg, run, run_key=run_key, device=device, ctx=ctx, previous=previous, name=name).run()
    if outcome["status"] == Status.INTERRUPTED:
        hand_on(outcome.get("signal"))
    return outcome
