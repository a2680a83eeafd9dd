"""Run directories -> a `Collection`: the runs frame, the metrics frame, the layers frame and
the environments, each run read from its text files (config.yaml, status.json, metrics.csv
or summary.csv, layers.csv, env.json)."""

from __future__ import annotations

import io
import json
import os
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from ..labels import STEP_TIMERS, all_zero_note, epoch_ranges
from ..runlock import holder_alive
from ..status import Status
from .configs import config_id, mark_duplicates, settings, unused_keys

# short columns of the runs frame and tables -> dotted config keys
CANONICAL = {
    "dataset": "dataset.name",
    "model": "model.name",
    "method": "method.name",
    "regularizer": "regularizer.name",
    "lam": "lam",
    "m": "m",
    "init": "init.scheme",
    "density": "init.density",
    "target_sparsity": "sparsity",
    "backend": "backend",
    "lr": "lr",
    "epochs": "epochs",
    "seed": "seed",
    "precision": "precision",
}

FINAL_METRICS = [
    "test_acc_pct",
    "sparsity_pct",
    "sparsity_all_params_pct",
    "conv_sparsity_pct",
    "train_flops_vs_sgd",
    "inference_flops_vs_dense",
    "train_loss",
    "test_loss",
    "train_acc_pct",
    "nonzeros",
    "prunable_params",
    "fine_steps",
    "coarse_steps",
    "train_gflops",
    "model_bytes_dense",
    "model_bytes_sparse",
]
# per-epoch seconds of metrics.csv -> summed over the run (Figure 2). The report's per-run columns
# (`time_train_s`, `time_forward_s`, ...) are what users read: they are the sums of metrics.csv's
# `epoch_s`, `forward_s`, ... columns; `time_other_s` is train minus the four measured parts.
TIME_COLUMNS = {"epoch_s": "time_train_s", **{col: f"time_{col}" for col, _ in STEP_TIMERS}, "eval_s": "time_eval_s"}
TIMED_PARTS = tuple(f"time_{col}" for col, _ in STEP_TIMERS)
LAYER_NUMBERS = ["epoch", "numel", "nonzeros", "density", "kernels", "zero_kernels"]


class ReportError(RuntimeError):
    """Bad input to the report (no such directory, no runs)."""


@dataclass
class Collection:
    runs: pd.DataFrame  # one row per run directory (included or not)
    metrics: pd.DataFrame  # one row per run and epoch (every run that has a metrics.csv)
    outside_sweep: int = 0  # runs under the directories that are not part of the --sweep selection
    layers: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "epoch", "layer"]))
    envs: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # run path -> env.json (None: none)


# -- finding and reading runs ------------------------------------------------------------------


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every directory under `paths` holding config.yaml and metrics.csv or status.json."""
    found: dict[Path, None] = {}
    for root in map(Path, paths):
        if not root.is_dir():
            raise ReportError(f"no such directory: {root}")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .hydra, .submitit
            if "config.yaml" in filenames and ("metrics.csv" in filenames or "status.json" in filenames):
                found.setdefault(Path(dirpath).resolve())
                dirnames[:] = []
    return list(found)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list):
        data = json.dumps(data)  # hashable, readable: "[256, 128]"
    return {prefix[:-1]: data}


def complete_lines(path: Path) -> io.StringIO:
    """The file's text up to its last newline: a row being appended by a running training
    (or cut short by a kill) is left out whole, never read as a shorter number."""
    text = path.read_text()
    return io.StringIO(text[: text.rfind("\n") + 1])


def _read_metrics(path: Path) -> pd.DataFrame | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        frame = pd.read_csv(complete_lines(path), on_bad_lines="skip")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return None
    if "epoch" not in frame:
        return None
    frame = frame.apply(pd.to_numeric, errors="coerce")
    # a line cut off by a kill has missing fields: keep only complete epochs
    frame = frame.dropna(subset=[c for c in ("epoch", "test_acc_pct", "sparsity_pct") if c in frame])
    return frame.sort_values("epoch").drop_duplicates("epoch", keep="last").reset_index(drop=True)


def read_layers(path: Path) -> pd.DataFrame | None:
    """A run's layers.csv (one row per prunable layer and epoch), or None when it has none."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        frame = pd.read_csv(complete_lines(path), on_bad_lines="skip", dtype={"layer": str, "kind": str, "shape": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return None
    if not {"epoch", "layer", "density"} <= set(frame.columns):
        return None
    for col in LAYER_NUMBERS:
        if col in frame:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    frame = frame.dropna(subset=["epoch", "layer", "density"])
    # the file's row order is the model's layer order (named_modules); plots keep it
    frame["layer_index"] = frame.groupby("epoch").cumcount()
    return frame.drop_duplicates(["epoch", "layer"], keep="last").reset_index(drop=True)


def read_env(path: Path) -> dict[str, Any] | None:
    """A run's env.json, or None when it has none (runs from before env.json) or it is unreadable."""
    try:
        env = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return env if isinstance(env, dict) else None


def _run_label(path: Path, flat: dict[str, Any]) -> str:
    """`dataset/model/method/slug` (the run name) when the directory follows that layout."""
    parts = path.parts
    expected = (flat.get("dataset.name"), flat.get("model.name"), flat.get("method.name"))
    if len(parts) >= 4 and tuple(parts[-4:-1]) == expected:
        return "/".join(parts[-4:])
    return str(path)


def _read_config(path: Path, row: dict[str, Any]) -> bool:
    """config.yaml -> the row's name, config columns and identity; False when it is unreadable."""

    from ..config import identity

    try:
        config = OmegaConf.load(path / "config.yaml")
    except Exception as err:  # noqa: BLE001 - an unreadable config is one more excluded run
        row.update(run=str(path), status="unreadable", included=False, reason=f"config.yaml: {err}")
        return False
    flat = _flatten({k: v for k, v in OmegaConf.to_container(config).items() if k != "hydra"})
    row["run"] = _run_label(path, flat)
    for short, key in CANONICAL.items():
        row[short] = flat.get(key)
    row["device"] = flat.get("device")
    row["_identity"] = _flatten(identity(config))  # the keys that name the run (config.run_name)
    return True


def _read_status(path: Path, row: dict[str, Any]) -> dict[str, Any]:
    """status.json -> the row's status and message (and what actually ran); returns its content."""
    status_file = path / "status.json"
    status: dict[str, Any] = {}
    if status_file.exists():
        try:
            status = json.loads(status_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            status = {"status": "unreadable"}
        if not isinstance(status, dict):  # valid JSON, but not a status record (`[1]`, `"x"`)
            status = {"status": "unreadable", "message": "status.json is not a JSON object"}
    row["status"] = status.get("status", "no status.json")
    row["message"] = status.get("message", "")
    if row["status"] == Status.RUNNING and holder_alive(path) is False:
        # status.json says running, but no process holds the run's lock: it was killed
        at = f" from its checkpoint after epoch {status['epoch']}" if status.get("epoch") else ""
        row["message"] = f"no process holds its lock (killed?); rerun the same command to resume it{at}"
    # what actually ran (device=auto, backend=auto resolved), for runs that recorded it
    for key in ("device", "backend"):
        if status.get(key):
            row[key] = status[key]
    return status


def _read_final(path: Path, row: dict[str, Any], status: dict[str, Any]) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """metrics.csv (or summary.csv) -> the row's final metrics, epochs done and summed timings;
    returns (the last metrics row, metrics.csv or None)."""
    metrics = _read_metrics(path / "metrics.csv")
    final: dict[str, Any] = {}
    if metrics is not None and len(metrics):
        final = metrics.iloc[-1].to_dict()
        for src, dst in TIME_COLUMNS.items():
            if src in metrics:
                row[dst] = float(metrics[src].sum())
    elif (path / "summary.csv").exists():
        try:
            final = pd.read_csv(path / "summary.csv").iloc[-1].to_dict()
        except Exception:  # noqa: BLE001
            final = {}
    row["epochs_done"] = (
        int(final["epoch"]) if "epoch" in final and not pd.isna(final["epoch"]) else (int(status.get("epoch", 0) or 0))
    )
    for key in FINAL_METRICS:
        row[key] = final.get(key, np.nan)
    parts = [row.get(c, np.nan) for c in TIMED_PARTS]
    if "time_train_s" in row and not any(pd.isna(p) for p in parts):
        row["time_other_s"] = max(0.0, row["time_train_s"] - sum(parts))
    return final, metrics


def _inclusion(row: dict[str, Any], final: dict[str, Any], has_metrics: bool) -> dict[str, Any]:
    """Whether the run counts (finished, every epoch in metrics.csv), and if not, why."""
    epochs = row.get("epochs")
    if row["status"] != Status.FINISHED:
        reason = row["status"] if not row["message"] else f"{row['status']}: {row['message']}"
        return dict(included=False, reason=reason)
    if not final:
        return dict(included=False, reason="finished, but no metrics.csv or summary.csv")
    if has_metrics and row["missing_epochs"]:
        total = int(epochs) if epochs is not None else row["epochs_done"]
        return dict(
            included=False,
            reason=f"finished, but metrics.csv has {total - len(row['missing_epochs'])} of "
            f"{total} epochs "
            f"(lacks {epoch_ranges(row['missing_epochs'])}); resume=false retrains it",
        )
    if pd.isna(row["test_acc_pct"]):
        return dict(included=False, reason="finished, but its last metrics row has no test accuracy")
    return dict(included=True, reason="")


def read_run(path: Path) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """One run directory -> (its row of the runs frame, its metrics.csv or None)."""
    row: dict[str, Any] = {"path": str(path)}
    if not _read_config(path, row):
        return row, None
    status = _read_status(path, row)
    final, metrics = _read_final(path, row, status)
    row["missing_epochs"] = _missing_epochs(metrics, row)
    row.update(_inclusion(row, final, metrics is not None))
    # a finished run's result that deserves a look (every weight zero)
    lam = row.get("lam") if "lam" not in unused_keys(str(row.get("method"))) else None
    row["note"] = (all_zero_note(final, lam) if row["status"] == Status.FINISHED else None) or ""
    row["missing_epochs"] = epoch_ranges(row["missing_epochs"])
    return row, metrics


def _missing_epochs(metrics: pd.DataFrame | None, row: dict[str, Any]) -> list[int]:
    """The epochs metrics.csv lacks: of 1..epochs for a finished run, before its last row for another."""
    if metrics is None:
        return []
    last = int(row["epochs"]) if row["status"] == Status.FINISHED and row.get("epochs") is not None else row["epochs_done"]
    return sorted(set(range(1, last + 1)) - set(metrics["epoch"].astype(int)))


# -- the collection --------------------------------------------------------------------------


def expand_sweep(overrides: list[str]) -> list[str]:
    """The run names that `mlbreg train -m <overrides>` produces (see `mlbreg.hydra_glue`)."""
    from ..hydra_glue import SweepError
    from ..hydra_glue import expand_sweep as expand

    try:
        return expand(overrides)
    except SweepError as err:
        raise ReportError(str(err)) from err


def _missing_rows(expected: Iterable[str], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs the sweeps make that no directory holds: status `missing`."""
    found = {row["run"] for row in rows}
    missing = []
    for name in expected:
        if name not in found:
            dataset, model, method = name.split("/")[:3]
            missing.append(
                dict(
                    run=name,
                    path="",
                    status="missing",
                    included=False,
                    reason="not run yet (no directory)",
                    dataset=dataset,
                    model=model,
                    method=method,
                )
            )
    return missing


def _runs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows -> the runs frame: every canonical column, duplicates marked, settings named."""
    runs = pd.DataFrame(rows)
    for col in ("config_id", "seed", *CANONICAL):
        if col not in runs:
            runs[col] = None
    runs = mark_duplicates(runs)
    runs["setting"] = settings(runs)
    return runs.drop(columns=["_key"], errors="ignore")


def collect(paths: Iterable[str | os.PathLike], sweeps: Iterable[str] = ()) -> Collection:
    """Every run under `paths` -> the runs frame and the metrics frame.

    With `sweeps` (each the override string of one `mlbreg train -m` command), only the runs
    those sweeps make are kept, and the ones not found are listed with status `missing`."""
    paths = list(paths)
    dirs = find_run_dirs(paths)
    expected: dict[str, None] = {}
    for sweep in sweeps:
        expected.update(dict.fromkeys(expand_sweep(shlex.split(sweep))))
    if not dirs and not expected:
        raise ReportError(f"no run directories (config.yaml + metrics.csv or status.json) under {', '.join(map(str, paths))}")
    rows, frames, layer_frames = [], [], []
    envs: dict[str, dict[str, Any] | None] = {}
    outside_sweep = 0
    for path in dirs:
        row, metrics = read_run(path)
        if expected and row["run"] not in expected:
            outside_sweep += 1
            continue
        ident = row.pop("_identity", None)
        if ident is not None:
            row["config_id"], row["_key"] = config_id(str(row.get("method")), ident)
        rows.append(row)
        if metrics is not None:
            frames.append(metrics.assign(path=row["path"]))
        layers = read_layers(path / "layers.csv")
        if layers is not None:
            layer_frames.append(layers.assign(path=row["path"]))
        envs[row["path"]] = read_env(path / "env.json")
    rows += _missing_rows(expected, rows)
    if not rows:
        raise ReportError(f"none of the {len(expected)} runs of the sweep(s) is under {', '.join(map(str, paths))}")
    runs = _runs_frame(rows)
    metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["path", "epoch"])
    info = runs[["path", "run", "config_id", "included", "dataset", "model", "method", "setting", "seed"]].copy()
    metrics = metrics.merge(info, on="path", how="left")
    layers = (
        pd.concat(layer_frames, ignore_index=True)
        if layer_frames
        else pd.DataFrame(columns=["path", "epoch", "layer", "layer_index", "density"])
    )
    layers = layers.merge(info, on="path", how="left")
    return Collection(runs=runs, metrics=metrics, outside_sweep=outside_sweep, layers=layers, envs=envs)
