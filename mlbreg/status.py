"""The states of a run, as status.json spells them (a leaf module: imports nothing of mlbreg)."""

from __future__ import annotations

__all__ = ["Status"]


class Status:
    """The `status` of a run's status.json: plain strings (JSON, CSV and comparisons stay simple)."""

    RUNNING = "running"  # training, or killed without a signal (the lock tells which)
    FINISHED = "finished"  # every epoch's row written; model.pt and summary.csv exist
    INTERRUPTED = "interrupted"  # stopped by a signal after a checkpoint; a rerun resumes it
    DIVERGED = "diverged"  # a non-finite training loss
    FAILED = "failed"  # an error; the message says which
    ALL = (RUNNING, FINISHED, INTERRUPTED, DIVERGED, FAILED)
