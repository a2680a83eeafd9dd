"""The machine's record of timed layer choices: one JSON file per machine, shared by every run on it.

A timed comparison answers "on this machine, at this thread count, is this layer (shape, batch size,
precision, memory format, support size) faster sparse or dense?". Timing it afresh in every launch made
two launches of one command differ whenever the machine's load tipped a close call, so the answer is
timed once per machine and then read by every later launch: same command, same seed, same machine, same
choices, whatever else the machine is doing. A lock makes concurrent launches (a parallel sweep) wait
for the first one's timing instead of timing again.

File: ``$MLBREG_CHOICE_CACHE`` (a folder; ``off`` disables the record: every launch times afresh) or
``<cache>/layer-choices`` (see native/build.py for ``<cache>``), named by the CPU fingerprint and the
torch version. JSON only: reading it never runs code. A file that does not parse is set aside (renamed
``*.bad``) with a note, and the record starts empty.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from .native.build import cache_dir, cpu_fingerprint

__all__ = ["ChoiceStore", "default_store"]


class ChoiceStore:
    """key (str) -> entry (a JSON object) in one file; see the module docstring."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ChoiceStore({str(self.path)!r})"

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            data = err
        if not isinstance(data, dict):
            bad = self.path.with_suffix(".bad")
            print(
                f"mlbreg: note: the layer-choice record {self.path} is unreadable ({data!s:.80}); "
                f"moved to {bad}, timing afresh",
                file=sys.stderr,
            )
            os.replace(self.path, bad)
            return {}
        return data

    def get(self, key: str) -> dict | None:
        with self._locked():
            return self._read().get(key)

    def get_or_time(self, key: str, time_now: Callable[[], dict]) -> tuple[dict, bool]:
        """(entry, timed): the recorded entry, or a new one from ``time_now()`` (timed under the lock,
        so a concurrent launch waits for it and then reads it)."""
        with self._locked():
            data = self._read()
            if key in data:
                return data[key], False
            entry = time_now()
            data[key] = entry
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
            os.replace(tmp, self.path)
            return entry, True


def default_store() -> ChoiceStore | None:
    """This machine's store (None with ``MLBREG_CHOICE_CACHE=off``)."""
    folder = os.environ.get("MLBREG_CHOICE_CACHE") or str(cache_dir() / "layer-choices")
    if folder.lower() == "off":
        return None
    version = torch.__version__.replace("+", "_")
    return ChoiceStore(Path(folder) / f"{cpu_fingerprint()}_torch{version}.json")
