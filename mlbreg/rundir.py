"""A run directory is the unit of truth: status, CSVs, checkpoint, final model.

Files (all under the run directory):
- `status.json`   running / finished / interrupted / diverged / failed, with step and message
- `metrics.csv`   one row per epoch, appended and flushed as it is produced
- `layers.csv`    one row per prunable layer per epoch
- `summary.csv`   one row at the end: identifying config + final metrics
- `checkpoint.pt` everything to continue bit-for-bit (written atomically; read tensors-only)
- `model.pt`      the final model's state_dict
- `config.yaml`   the resolved config of the run
- `env.json`      provenance: code commit, library versions, CPU, threads, device (`mlbreg.env`)

Every write that replaces a file goes through a temporary file and `os.replace`, so a
kill at any moment leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .env import COMPARED_FIELDS
from .failures import naming
from .safe_load import TensorFileError, load_tensors
from .status import Status

# the layout of checkpoint.pt: raised when it changes, with a step in `upgrade_checkpoint`
CHECKPOINT_FORMAT = 2
STATUSES = Status.ALL


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


class RunFileError(RuntimeError):
    """A file of a run directory that mlbreg did not write (not a status record, say): the message says what to do."""


def atomic_write_bytes(path: Path, write) -> None:
    """`write(f)` into a temporary file of its own (PID + random suffix, same directory),
    fsync'd, then renamed over `path` and the directory fsync'd: readers and a kill at any
    moment see the old or the new file, and two writers never share a temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with naming(path):  # a full disk names `path`, not the temporary file
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder refuses the unlink too: keep the first error
            pass
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # e.g. a filesystem that cannot open directories: the rename stands
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CsvLog:
    """Append-only CSV with a fixed header; every row is flushed to disk when written.
    `key`: the columns that identify a row (metrics.csv: epoch; layers.csv: epoch, layer)."""

    def __init__(self, path: Path, columns: list[str], key: tuple[str, ...] = ("epoch",)):
        self.path = path
        self.columns = columns
        self.key = key

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with naming(self.path), open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="raise")
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())

    def keep_epochs_up_to(self, epoch: int) -> list[int]:
        """Drop rows of epochs after `epoch` (written after the checkpoint a run resumes
        from) and repeated rows of one key (the last one stays: what a rerun of the epoch
        wrote), and a last line cut short by a kill, so a resumed run has neither duplicate
        nor missing rows. Lines that are not rows (a wrong number of fields, no integer
        epoch: garbage appended to the file) are dropped too: returns their line numbers."""
        if not self.path.exists():
            return []
        text = self.path.read_text(errors="replace")
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]  # a row cut short by a kill mid-write
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or self.columns
        if "epoch" not in header:
            raise RunFileError(
                f"{self.path}: its first line is not a header of mlbreg's (no epoch column): "
                "move the file away, or start the run fresh with resume=false"
            )
        rows: dict[tuple, dict] = {}
        dropped: list[int] = []
        for row in reader:
            if None in row or None in row.values() or not row["epoch"].strip().isdigit():
                dropped.append(reader.line_num)
                continue
            if int(row["epoch"]) <= epoch:
                key = tuple(row.get(k) for k in self.key)
                rows.pop(key, None)  # re-insert: the last occurrence, in its place
                rows[key] = row
        kept = list(rows.values())

        def write(fb):
            text = _rows_to_text(header, kept)
            fb.write(text.encode())

        atomic_write_bytes(self.path, write)
        return dropped

    def missing_epochs(self, epoch: int, per_epoch: Iterable[str] = ()) -> list[int]:
        """The epochs 1..`epoch` (a checkpoint's) without a complete row in the file, reading
        complete lines only. `per_epoch`: the values of the key's second column every epoch
        must have (layers.csv: the model's layer names)."""
        text = self.path.read_text() if epoch > 0 and self.path.exists() else ""
        found: dict[int, set] = {}
        for row in csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1], newline="")):
            try:
                number = int(row.get("epoch") or "")
            except ValueError:
                continue  # not a row of this file: it holds no epoch
            if None not in row.values():  # every column there (None: a line cut short)
                found.setdefault(number, set()).add(tuple(row.get(k) for k in self.key[1:]))
        needed = {(value,) for value in per_epoch} or {()}
        return [e for e in range(1, epoch + 1) if not needed <= found.get(e, set())]


def _rows_to_text(header, rows) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # -- paths -------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def file(self, name: str) -> Path:
        return self.path / name

    # -- status ------------------------------------------------------------------------
    def read_status(self, strict: bool = False) -> dict[str, Any] | None:
        """status.json's record; None when there is none, or (unless `strict`: a RunFileError
        that says what to do) when the file is not a status record: not JSON, or JSON but
        not an object."""
        path = self.path / "status.json"
        if not path.exists():
            return None
        try:
            status = json.loads(path.read_text())
            kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
            what = f"valid JSON, but {kind.get(type(status), 'null')}, not an object"
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            status, what = None, f"not JSON: {err}"
        if isinstance(status, dict):
            return status
        if strict:
            raise RunFileError(
                f"{path} is not a run status ({what}), so mlbreg cannot tell whether this run finished. "
                "Restore the file; if the run had not finished, delete it to resume from checkpoint.pt; "
                "resume=false trains the run again from the start"
            )
        return None

    def write_status(self, status: str, **info: Any) -> None:
        assert status in STATUSES, status
        self.path.mkdir(parents=True, exist_ok=True)
        # UTC with the zone written out: runs of a sweep may finish on machines in other zones
        data = dict(status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info)
        atomic_write_bytes(self.path / "status.json", lambda f: f.write(json.dumps(data, indent=1).encode()))

    def write_env(self, env: dict[str, Any]) -> None:
        """env.json of this attempt; the environments of earlier attempts (a run resumed on
        another node or after an upgrade) are kept in its `earlier` list when they differ."""
        path = self.path / "env.json"
        earlier: list[dict[str, Any]] = []
        if path.exists():
            try:
                old = json.loads(path.read_text())
                earlier = old.pop("earlier", [])
                if any(old.get(k) != env.get(k) for k in COMPARED_FIELDS):
                    earlier.append({k: old.get(k) for k in COMPARED_FIELDS + ("hostname", "started")})
            except (json.JSONDecodeError, AttributeError):
                pass
        data = dict(env, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), earlier=earlier)
        atomic_write_bytes(path, lambda f: f.write(json.dumps(data, indent=1).encode()))

    def update_env(self, **fields: Any) -> None:
        """Set `fields` in this attempt's env.json (written by `write_env` at the start)."""
        path = self.path / "env.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        if all(data.get(k) == v for k, v in fields.items()):
            return
        data.update(fields)
        atomic_write_bytes(path, lambda f: f.write(json.dumps(data, indent=1).encode()))

    # -- checkpoints -------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        state = dict(state, format=CHECKPOINT_FORMAT)
        atomic_write_bytes(self.checkpoint_path, lambda f: torch.save(state, f))

    def load_checkpoint(self, run_key: str) -> dict[str, Any]:
        """The checkpoint, loaded tensors-only (`mlbreg.safe_load`): a file holding any other
        Python object is refused, never unpickled."""
        try:
            state = load_tensors(self.checkpoint_path, "checkpoint")
        except TensorFileError as err:
            older = (
                " (an mlbreg before 2026-12-06 stored numpy's RNG state so)" if (err.refused or "").startswith("numpy") else ""
            )
            raise CheckpointError(
                f"{err}{older}. Start this run fresh with resume=false "
                f"(its rows and checkpoint are replaced), or move the file away."
            ) from err
        if not isinstance(state, dict) or state.get("run_key") != run_key:
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path} belongs to a different config or mlbreg version "
                f"(run key {state.get('run_key') if isinstance(state, dict) else None!r}, expected {run_key!r}). "
                f"Start fresh with resume=false."
            )
        return upgrade_checkpoint(state, self.checkpoint_path)

    def save_model(self, model_state: dict[str, Any]) -> None:
        atomic_write_bytes(self.path / "model.pt", lambda f: torch.save(model_state, f))

    def clear(self) -> None:
        """Remove the results of an earlier attempt (resume=false)."""
        for name in ("metrics.csv", "layers.csv", "summary.csv", "checkpoint.pt", "model.pt", "status.json", "env.json"):
            (self.path / name).unlink(missing_ok=True)


def upgrade_checkpoint(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """The one place that knows older checkpoint layouts: map `state` to `CHECKPOINT_FORMAT`, or refuse.

    Format 2 (2026-12-06): tensors and plain values only, a `format` entry, the layer choices keyed
    by shape and bin of support sizes. Format 1 (no `format` entry: mlbreg before 2026-12-06) held
    numpy's RNG state as a numpy array, so a tensors-only load refuses it before it gets here; what
    does get here without a format (a file edited by hand) cannot be mapped either."""
    found = state.get("format")
    if found == CHECKPOINT_FORMAT:
        return state
    raise CheckpointError(
        f"checkpoint {path} has format {found if found is not None else 1}, written by "
        f"{'an older' if found is None or found < CHECKPOINT_FORMAT else 'a newer'} mlbreg; this one reads "
        f"format {CHECKPOINT_FORMAT} only. Start this run fresh with resume=false, or resume it with the "
        f"mlbreg that wrote it."
    )
