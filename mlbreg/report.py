"""`mlbreg report DIR [DIR ...] [--out OUTDIR]`: run directories -> the paper's tables and plots.

The text files a run writes are read (config.yaml, status.json, metrics.csv or, when it is
missing, summary.csv, layers.csv, env.json), plus model.pt of a few runs for the mask
pictures: no checkpoint, no network, no dashboard.

Data flows one way:

    run dirs -> `collect` -> runs frame (one row per run: config, status, final metrics,
                             summed timings) + metrics frame (one row per run and epoch)
                             + layers frame (one row per run, epoch and prunable layer)
                             + environments (env.json per run)
             -> `aggregate` -> one row per configuration: mean, std (ddof=1) and n over seeds
                `aggregate_layers` -> one row per configuration and layer (final epoch)
                `environment_notes` -> the compared env.json fields that differ
                `mask_runs` -> model.pt of one run per chosen configuration -> `LayerMask`s
             -> tables (CSV, Markdown, LaTeX) and plots (PNG, PDF)

Which runs count: a run is *included* when status.json says `finished` and metrics.csv
has a row for every epoch of its config. Every other run (running, interrupted, diverged,
failed, no status, truncated metrics) is listed by name with its status and the reason,
and left out of every mean, every plot and the environment comparison.

A configuration is the run's identifying config (`mlbreg.config.identity`) without the
seed, after blanking the keys the method does not use (λ and m for SGD, the init for the
dense-start methods, ...; `IGNORED_KEYS`). So `method=sgd,mllinbreg lam=0.5,1` counts SGD
once, not once per λ: two runs with the same configuration and seed are the same
computation, and the second is counted as a duplicate, not as another seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

# -- names on tables and plots ----------------------------------------------------------------

METHOD_ORDER = ["sgd", "prune_finetune", "rigl", "linbreg", "mllinbreg"]
METHOD_LABELS = {"sgd": "SGD", "prune_finetune": "Prune+Fine-Tuning", "rigl": "RigL", "linbreg": "LinBreg",
                 "mllinbreg": "ML LinBreg"}
METHOD_COLORS = {"sgd": "0.25", "prune_finetune": "tab:orange", "rigl": "tab:green", "linbreg": "tab:blue",
                 "mllinbreg": "tab:red"}
MODEL_LABELS = {"resnet18": "ResNet18", "vgg16": "VGG16", "wrn28_10": "WideResNet28-10", "mlp": "MLP",
                "convnet": "ConvNet"}
DATASET_LABELS = {"cifar10": "CIFAR-10", "tinyimagenet": "TinyImageNet", "digits": "digits (8x8)", "mnist": "MNIST",
                  "fashion_mnist": "Fashion-MNIST", "synthetic": "synthetic"}
# config keys (dotted) as they appear in a table's "Setting" column
KEY_LABELS = {"lam": "λ", "m": "m", "init.scheme": "init", "init.density": "init density", "init.scale": "init scale",
              "sparsity": "target", "regularizer.name": "reg", "backend": "backend", "lr": "lr", "epochs": "epochs",
              "method.finetune_epochs": "fine-tune epochs", "method.criterion": "criterion"}
# the hyperparameter each method's rows are "about" (always shown, and the x of its curve in Figure 1)
MAIN_KEYS = {"linbreg": ["lam"], "mllinbreg": ["lam"], "rigl": ["sparsity"], "prune_finetune": ["sparsity"]}

# Config keys a method does not read (algorithms.md §3-§5, mlbreg.methods): blanked before grouping.
_INIT_KEYS = ("init.scheme", "init.density", "init.scale", "init.dense_first", "init.dense_last")
IGNORED_KEYS: dict[str, tuple[str, ...]] = {
    "sgd": ("lam", "m", "regularizer.name", "sparsity") + _INIT_KEYS,             # dense Kaiming start
    "prune_finetune": ("lam", "m", "regularizer.name") + _INIT_KEYS,              # dense Kaiming start
    "rigl": ("lam", "m", "regularizer.name", "init.density"),                     # density = 1 - sparsity
    "linbreg": ("m", "sparsity"),
    "mllinbreg": ("sparsity",),
}
# short columns of the runs frame and tables -> dotted config keys
CANONICAL = {"dataset": "dataset.name", "model": "model.name", "method": "method.name",
             "regularizer": "regularizer.name", "lam": "lam", "m": "m", "init": "init.scheme",
             "density": "init.density", "target_sparsity": "sparsity", "backend": "backend", "lr": "lr",
             "epochs": "epochs", "seed": "seed"}

FINAL_METRICS = ["test_acc_pct", "sparsity_pct", "sparsity_all_params_pct", "conv_sparsity_pct",
                 "train_flops_vs_sgd", "inference_flops_vs_dense", "train_loss", "test_loss", "train_acc_pct",
                 "nonzeros", "prunable_params", "fine_steps", "coarse_steps", "train_gflops",
                 "model_bytes_dense", "model_bytes_sparse"]
# per-epoch seconds of metrics.csv -> summed over the run (Figure 2)
TIME_COLUMNS = {"epoch_s": "time_train_s", "forward_s": "time_forward_s", "backward_s": "time_backward_s",
                "optimizer_s": "time_optimizer_s", "swap_s": "time_swap_s", "eval_s": "time_eval_s"}
TIME_PARTS = [("time_forward_s", "forward"), ("time_backward_s", "backward"), ("time_optimizer_s", "optimizer step"),
              ("time_swap_s", "layer swaps"), ("time_other_s", "other (data, bookkeeping)")]
AGG_METRICS = FINAL_METRICS + list(TIME_COLUMNS.values()) + ["time_other_s"]


class ReportError(RuntimeError):
    """Bad input to the report (no such directory, no runs)."""


@dataclass
class Collection:
    runs: pd.DataFrame      # one row per run directory (included or not)
    metrics: pd.DataFrame   # one row per run and epoch (every run that has a metrics.csv)
    ignored: int = 0        # runs under the directories that are not part of the --sweep selection
    layers: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "epoch", "layer"]))
    envs: dict[str, dict[str, Any] | None] = field(default_factory=dict)   # run path -> env.json (None: none)


# -- finding and reading runs ------------------------------------------------------------------

def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every directory under `paths` holding config.yaml and metrics.csv or status.json."""
    found: dict[Path, None] = {}
    for root in map(Path, paths):
        if not root.is_dir():
            raise ReportError(f"no such directory: {root}")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))   # .hydra, .submitit
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
        data = json.dumps(data)   # hashable, readable: "[256, 128]"
    return {prefix[:-1]: data}


def _read_metrics(path: Path) -> pd.DataFrame | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        frame = pd.read_csv(path, on_bad_lines="skip")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return None
    if "epoch" not in frame:
        return None
    frame = frame.apply(pd.to_numeric, errors="coerce")
    # a line cut off by a kill has missing fields: keep only complete epochs
    frame = frame.dropna(subset=[c for c in ("epoch", "test_acc_pct", "sparsity_pct") if c in frame])
    return frame.sort_values("epoch").drop_duplicates("epoch", keep="last").reset_index(drop=True)


LAYER_NUMBERS = ["epoch", "numel", "nonzeros", "density", "kernels", "zero_kernels"]


def read_layers(path: Path) -> pd.DataFrame | None:
    """A run's layers.csv (one row per prunable layer and epoch), or None when it has none."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        frame = pd.read_csv(path, on_bad_lines="skip", dtype={"layer": str, "kind": str, "shape": str})
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


def read_run(path: Path) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """One run directory -> (its row of the runs frame, its metrics.csv or None)."""
    from omegaconf import OmegaConf
    from .config import identity

    row: dict[str, Any] = {"path": str(path)}
    try:
        config = OmegaConf.load(path / "config.yaml")
    except Exception as err:  # noqa: BLE001 - an unreadable config is one more excluded run
        row.update(run=str(path), status="unreadable", included=False, reason=f"config.yaml: {err}")
        return row, None
    flat = _flatten({k: v for k, v in OmegaConf.to_container(config).items() if k != "hydra"})
    ident = _flatten(identity(config))   # the keys that name the run (config.run_name)
    row["run"] = _run_label(path, flat)
    for short, key in CANONICAL.items():
        row[short] = flat.get(key)
    row["device"] = flat.get("device")
    row["_identity"] = ident

    status_file = path / "status.json"
    status: dict[str, Any] = {}
    if status_file.exists():
        try:
            status = json.loads(status_file.read_text())
        except (json.JSONDecodeError, OSError):
            status = {"status": "unreadable"}
    row["status"] = status.get("status", "no status.json")
    row["message"] = status.get("message", "")
    # what actually ran (device=auto, backend=auto resolved), for runs that recorded it
    for key in ("device", "backend"):
        if status.get(key):
            row[key] = status[key]

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
    row["epochs_done"] = int(final["epoch"]) if "epoch" in final and not pd.isna(final["epoch"]) else (
        int(status.get("epoch", 0) or 0))
    for key in FINAL_METRICS:
        row[key] = final.get(key, np.nan)
    parts = [row.get(c, np.nan) for c in ("time_forward_s", "time_backward_s", "time_optimizer_s", "time_swap_s")]
    if "time_train_s" in row and not any(pd.isna(p) for p in parts):
        row["time_other_s"] = max(0.0, row["time_train_s"] - sum(parts))

    epochs = row.get("epochs")
    if row["status"] != "finished":
        reason = row["status"] if not row["message"] else f"{row['status']}: {row['message']}"
        row.update(included=False, reason=reason)
    elif not final:
        row.update(included=False, reason="finished, but no metrics.csv or summary.csv")
    elif metrics is not None and epochs is not None and row["epochs_done"] < int(epochs):
        row.update(included=False, reason=f"finished, but metrics.csv has {row['epochs_done']} of {epochs} epochs")
    elif pd.isna(row["test_acc_pct"]):
        row.update(included=False, reason="finished, but its last metrics row has no test accuracy")
    else:
        row.update(included=True, reason="")
    return row, metrics


def _config_id(method: str, ident: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The configuration a run belongs to: its identity without seed and unused keys."""
    ignored = IGNORED_KEYS.get(method, ())
    key = {k: v for k, v in ident.items() if k != "seed" and k not in ignored}
    from .config import digest
    return digest(key, 10), key


def expand_sweep(overrides: list[str]) -> list[str]:
    """The run names that `mlbreg train -m <overrides>` produces (see `mlbreg.hydra_glue`)."""
    from .hydra_glue import SweepError, expand_sweep as expand
    try:
        return expand(overrides)
    except SweepError as err:
        raise ReportError(str(err)) from err


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
        raise ReportError(f"no run directories (config.yaml + metrics.csv or status.json) under "
                          f"{', '.join(map(str, paths))}")
    rows, frames, layer_frames = [], [], []
    envs: dict[str, dict[str, Any] | None] = {}
    ignored = 0
    for path in dirs:
        row, metrics = read_run(path)
        if expected and row["run"] not in expected:
            ignored += 1
            continue
        ident = row.pop("_identity", None)
        if ident is not None:
            row["config_id"], key = _config_id(str(row.get("method")), ident)
            row["_key"] = key
        rows.append(row)
        if metrics is not None:
            frames.append(metrics.assign(path=row["path"]))
        layers = read_layers(path / "layers.csv")
        if layers is not None:
            layer_frames.append(layers.assign(path=row["path"]))
        envs[row["path"]] = read_env(path / "env.json")
    found = {row["run"] for row in rows}
    for name in expected:
        if name not in found:
            dataset, model, method = name.split("/")[:3]
            rows.append(dict(run=name, path="", status="missing", included=False, reason="not run yet (no directory)",
                             dataset=dataset, model=model, method=method))
    if not rows:
        raise ReportError(f"none of the {len(expected)} runs of the sweep(s) is under {', '.join(map(str, paths))}")
    runs = pd.DataFrame(rows)
    for col in ("config_id", "seed", *CANONICAL):
        if col not in runs:
            runs[col] = None
    runs = _mark_duplicates(runs)
    runs["setting"] = _settings(runs)
    runs = runs.drop(columns=["_key"], errors="ignore")
    metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["path", "epoch"])
    info = runs[["path", "run", "config_id", "included", "dataset", "model", "method", "setting", "seed"]].copy()
    metrics = metrics.merge(info, on="path", how="left")
    layers = (pd.concat(layer_frames, ignore_index=True) if layer_frames
              else pd.DataFrame(columns=["path", "epoch", "layer", "layer_index", "density"]))
    layers = layers.merge(info, on="path", how="left")
    return Collection(runs=runs, metrics=metrics, ignored=ignored, layers=layers, envs=envs)


def _mark_duplicates(runs: pd.DataFrame) -> pd.DataFrame:
    """Two included runs of one configuration and one seed: the same computation, counted once."""
    runs = runs.sort_values("run", kind="stable").reset_index(drop=True)
    included = runs[runs["included"].astype(bool)]
    firsts = included.groupby(["config_id", "seed"], dropna=False)["run"].transform("first")
    for i in included.index[included["run"] != firsts]:
        first = firsts.at[i]
        runs.at[i, "included"] = False
        runs.at[i, "reason"] = f"duplicate: same configuration and seed as {first} (keys the method ignores differ)"
        runs.at[i, "status"] = "duplicate"
    return runs


def _fmt_value(key: str, value: Any) -> str:
    if key == "sparsity" and isinstance(value, (int, float)):
        return f"{100 * value:g}%"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _settings(runs: pd.DataFrame) -> list[str]:
    """Per run, the hyperparameters that tell its configuration apart, e.g. "λ=1, m=100".

    Shown: the method's main key (λ for the Bregman methods, the target sparsity for RigL
    and pruning) and every other identifying key that varies between the configurations of
    one (dataset, model, method), except the seed."""
    labels = [""] * len(runs)
    if "_key" not in runs:
        return labels
    for _, block in runs.groupby(["dataset", "model", "method"], dropna=False, sort=False):
        keys = [k for k in block["_key"] if isinstance(k, dict)]
        all_keys = sorted({k for key in keys for k in key})
        varying = [k for k in all_keys if len({json.dumps(key.get(k), default=str) for key in keys}) > 1]
        method = str(block["method"].iloc[0])
        main = MAIN_KEYS.get(method, [])
        shown = main + [k for k in varying if k not in main and k not in ("dataset.name", "model.name", "method.name")]
        for i in block.index:
            key = runs.at[i, "_key"]
            if not isinstance(key, dict):
                continue
            parts = [f"{KEY_LABELS.get(k, k)}={_fmt_value(k, key[k])}" for k in shown if k in key]
            labels[runs.index.get_loc(i)] = ", ".join(parts)
    return labels


# -- aggregation -----------------------------------------------------------------------------

def _rank(values: pd.Series, order: list[str]) -> pd.Series:
    return values.map(lambda v: order.index(v) if v in order else len(order))


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Included runs -> one row per configuration: `<metric>_mean`, `<metric>_std` (ddof=1), n, seeds."""
    ok = runs[runs["included"].astype(bool)]
    if ok.empty:
        return pd.DataFrame()
    describe = ["dataset", "model", "method", "setting", "regularizer", "lam", "m", "init", "density",
                "target_sparsity", "backend", "lr", "epochs", "device"]
    rows = []
    for config_id, group in ok.groupby("config_id", sort=False):
        first = group.iloc[0]
        method = first["method"]
        row = {"config_id": config_id}
        for col in describe:
            row[col] = first.get(col)
        for col, key in CANONICAL.items():
            if key in IGNORED_KEYS.get(method, ()):
                row[col] = None
        row["n"] = int(group["seed"].nunique())
        row["seeds"] = ",".join(str(s) for s in sorted(group["seed"].unique()))
        for metric in AGG_METRICS:
            if metric in group:
                values = pd.to_numeric(group[metric], errors="coerce")
                row[f"{metric}_mean"] = values.mean()
                row[f"{metric}_std"] = values.std(ddof=1) if values.count() > 1 else np.nan
        rows.append(row)
    agg = pd.DataFrame(rows)
    order = {"dataset": list(DATASET_LABELS), "model": list(MODEL_LABELS), "method": METHOD_ORDER,
             "init": ["uniform", "er", "erk"]}
    for col, values in order.items():
        agg[f"_{col}_rank"] = _rank(agg[col], values)
    sort = ["_dataset_rank", "dataset", "_model_rank", "model", "_method_rank", "lam", "target_sparsity", "m",
            "_init_rank", "setting"]
    agg = agg.sort_values(sort, kind="stable", na_position="first").reset_index(drop=True)
    return agg.drop(columns=[c for c in agg if c.startswith("_")])


def representatives(block: pd.DataFrame) -> pd.DataFrame:
    """One configuration per method: most seeds, then the median of its main hyperparameter
    (λ for the Bregman methods, the target for RigL and pruning), so methods meet mid-range."""
    chosen = []
    for _, group in block.groupby("method", sort=False):
        group = group[group["n"] == group["n"].max()]
        key = next((c for c in ("lam", "target_sparsity") if group[c].notna().any()), None)
        if key is not None:
            group = group.sort_values(key, kind="stable")
        chosen.append(group.index[(len(group) - 1) // 2])
    return block.loc[chosen]


def final_layers(layers: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The layers frame's rows of the included runs at their final epoch (runs whose
    layers.csv lacks that epoch, or is missing, contribute nothing)."""
    if layers.empty:
        return layers
    done = runs.loc[runs["included"].astype(bool), ["path", "epochs_done"]]
    rows = layers.merge(done, on="path", how="inner")
    return rows[rows["epoch"] == rows["epochs_done"]].drop(columns="epochs_done")


def aggregate_layers(layers: pd.DataFrame, runs: pd.DataFrame, agg: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration and prunable layer at the final epoch: density, non-zeros and
    empty kernels as mean and std (ddof=1) over the seeds that have a layers.csv; `agg`'s
    configuration order, the model's layer order."""
    final = final_layers(layers, runs)
    if final.empty or agg.empty:
        return pd.DataFrame()
    out = []
    for _, conf in agg.iterrows():
        rows = final[final["config_id"] == conf["config_id"]]
        for layer, group in sorted(rows.groupby("layer", sort=False), key=lambda g: g[1]["layer_index"].min()):
            first = group.iloc[0]
            row = dict(dataset=conf["dataset"], model=conf["model"], method=conf["method"], setting=conf["setting"],
                       config_id=conf["config_id"], n=int(group["seed"].nunique()),
                       seeds=",".join(str(s) for s in sorted(group["seed"].unique())), epoch=int(first["epoch"]),
                       layer=layer, layer_index=int(first["layer_index"]), kind=first.get("kind"),
                       shape=first.get("shape"), numel=first.get("numel"), kernels=first.get("kernels"))
            for col in ("density", "nonzeros", "zero_kernels"):
                values = pd.to_numeric(group[col], errors="coerce") if col in group else pd.Series(dtype=float)
                row[f"{col}_mean"] = values.mean()
                row[f"{col}_std"] = values.std(ddof=1) if values.count() > 1 else np.nan
            out.append(row)
    return pd.DataFrame(out)


# -- tables ----------------------------------------------------------------------------------

def _pm(mean: float, std: float, digits: int = 2, latex: bool = False) -> str:
    if pd.isna(mean):
        return "–"
    if pd.isna(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} $\\pm$ {std:.{digits}f}" if latex else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _pct(mean: float, std: float, latex: bool = False) -> str:
    """A ratio as a percentage (FLOPs relative to SGD)."""
    return _pm(100 * mean, 100 * std if not pd.isna(std) else std, 1, latex)


def _has_conv(agg: pd.DataFrame) -> bool:
    """Whether a convolutional sparsity column means anything (some model has conv layers)."""
    if agg["model"].isin(["resnet18", "vgg16", "wrn28_10", "convnet"]).any():
        return True
    return "conv_sparsity_pct_mean" in agg and bool((agg["conv_sparsity_pct_mean"].fillna(0) > 0).any())


def results_table(agg: pd.DataFrame, latex: bool = False) -> pd.DataFrame:
    """Table 1: architecture, method, setting -> n, sparsity and test accuracy (mean ± std)."""
    table = pd.DataFrame({
        "Dataset": agg["dataset"].map(lambda v: DATASET_LABELS.get(v, v)),
        "Architecture": agg["model"].map(lambda v: MODEL_LABELS.get(v, v)),
        "Method": agg["method"].map(lambda v: METHOD_LABELS.get(v, v)),
        "Setting": agg["setting"].fillna(""),
        "n": agg["n"],
        "Sparsity (%)": [_pm(m, s, latex=latex) for m, s in zip(agg["sparsity_pct_mean"], agg["sparsity_pct_std"])],
        "Test acc (%)": [_pm(m, s, latex=latex) for m, s in zip(agg["test_acc_pct_mean"], agg["test_acc_pct_std"])],
    })
    if _has_conv(agg):
        table["Conv. sparsity (%)"] = [_pm(m, s, latex=latex) for m, s in
                                       zip(agg["conv_sparsity_pct_mean"], agg["conv_sparsity_pct_std"])]
    table["Train FLOPs (% of SGD)"] = [_pct(m, s, latex) for m, s in
                                       zip(agg["train_flops_vs_sgd_mean"], agg["train_flops_vs_sgd_std"])]
    dense, sparse = agg.get("model_bytes_dense_mean"), agg.get("model_bytes_sparse_mean")
    if dense is not None and sparse is not None and (dense.notna() | sparse.notna()).any():
        table["Model size (dense / compressed)"] = [_size_pair(d, s) for d, s in zip(dense, sparse)]
    return table


def human_bytes(n: float) -> str:
    """A byte count in decimal units with three significant digits ("84.3 kB"); "" for NaN."""
    if n is None or pd.isna(n):
        return ""
    units = ["B", "kB", "MB", "GB", "TB"]
    k = 0 if n < 1000 else min(len(units) - 1, int(math.log10(n) // 3))
    text = f"{n / 1000 ** k:.3g}"
    if float(text) >= 1000 and k + 1 < len(units):   # 999.7 kB rounds to "1e+03": the next unit
        k += 1
        text = f"{n / 1000 ** k:.3g}"
    return f"{n:.0f} B" if k == 0 else f"{text} {units[k]}"


def _size_pair(dense: float, sparse: float) -> str:
    """Runs from before the size columns have neither: a blank cell."""
    if pd.isna(dense) and pd.isna(sparse):
        return ""
    return f"{human_bytes(dense) or '–'} / {human_bytes(sparse) or '–'}"


def mask_init_table(agg: pd.DataFrame, latex: bool = False) -> pd.DataFrame | None:
    """Table 2: methods run with several mask initializations -> sparsity, test accuracy per scheme."""
    sparse = agg[agg["init"].notna()]
    if sparse.empty:
        return None
    counts = sparse.groupby(["dataset", "model", "method"])["init"].nunique()
    keep = counts[counts > 1].index
    if not len(keep):
        return None
    rows = sparse.set_index(["dataset", "model", "method"]).index.isin(keep)
    sub = sparse[rows]

    def other(setting: str, init: str) -> str:
        parts = [p for p in str(setting).split(", ") if p and p != f"init={init}"]
        return ", ".join(parts)
    return pd.DataFrame({
        "Dataset": sub["dataset"].map(lambda v: DATASET_LABELS.get(v, v)),
        "Architecture": sub["model"].map(lambda v: MODEL_LABELS.get(v, v)),
        "Method": sub["method"].map(lambda v: METHOD_LABELS.get(v, v)),
        "Mask initialization": sub["init"].map(lambda v: {"uniform": "Uniform", "er": "ER", "erk": "ERK"}.get(v, v)),
        "Setting": [other(s, i) for s, i in zip(sub["setting"], sub["init"])],
        "n": sub["n"],
        "Sparsity (%)": [_pm(m, s, 3, latex) for m, s in zip(sub["sparsity_pct_mean"], sub["sparsity_pct_std"])],
        "Test acc (%)": [_pm(m, s, 3, latex) for m, s in zip(sub["test_acc_pct_mean"], sub["test_acc_pct_std"])],
    }).reset_index(drop=True)


def layers_table(layer_agg: pd.DataFrame, latex: bool = False) -> pd.DataFrame | None:
    """Per configuration and layer at the final epoch: density (%), non-zeros and (convs)
    empty kernels, mean ± std over seeds."""
    if layer_agg.empty:
        return None
    table = pd.DataFrame({
        "Dataset": layer_agg["dataset"].map(lambda v: DATASET_LABELS.get(v, v)),
        "Architecture": layer_agg["model"].map(lambda v: MODEL_LABELS.get(v, v)),
        "Method": layer_agg["method"].map(lambda v: METHOD_LABELS.get(v, v)),
        "Setting": layer_agg["setting"].fillna(""),
        "n": layer_agg["n"],
        "Layer": layer_agg["layer"],
        "Shape": layer_agg["shape"].fillna(""),
        "Density (%)": [_pm(100 * m, 100 * s if not pd.isna(s) else s, latex=latex)
                        for m, s in zip(layer_agg["density_mean"], layer_agg["density_std"])],
        "Non-zeros": [f"{m:,.0f} / {t:,.0f}" if not pd.isna(m) and not pd.isna(t) else "–"
                      for m, t in zip(layer_agg["nonzeros_mean"], layer_agg["numel"])],
    })
    if (layer_agg["kind"] == "conv").any():
        table["Empty kernels"] = [f"{m:,.1f} / {t:,.0f}" if k == "conv" and not pd.isna(m) else ""
                                  for k, m, t in zip(layer_agg["kind"], layer_agg["zero_kernels_mean"],
                                                     layer_agg["kernels"])]
    return table


def cpu_time_table(agg: pd.DataFrame) -> pd.DataFrame | None:
    """Figure 2 as numbers: training seconds (summed over epochs) split by phase, per configuration."""
    if "time_train_s_mean" not in agg or agg["time_train_s_mean"].isna().all():
        return None
    table = pd.DataFrame({
        "Dataset": agg["dataset"].map(lambda v: DATASET_LABELS.get(v, v)),
        "Architecture": agg["model"].map(lambda v: MODEL_LABELS.get(v, v)),
        "Method": agg["method"].map(lambda v: METHOD_LABELS.get(v, v)),
        "Setting": agg["setting"].fillna(""),
        "Backend": agg["backend"], "Device": agg["device"], "Epochs": agg["epochs"], "n": agg["n"],
    })
    for col, name in [("time_train_s", "Train (s)")] + [(c, f"{n.split(' (')[0].capitalize()} (s)") for c, n in TIME_PARTS]:
        table[name] = [_pm(m, s, 2) for m, s in zip(agg.get(f"{col}_mean", np.nan), agg.get(f"{col}_std", np.nan))]
    return table


def to_markdown(table: pd.DataFrame) -> str:
    cells = [[str(v) for v in row] for row in table.itertuples(index=False)]
    header = [str(c) for c in table.columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out) + "\n"


def _latex_escape(text: str) -> str:
    text = str(text)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(a, b)
    return text.replace("λ", r"$\lambda$").replace("±", r"$\pm$")


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular; the first columns are not repeated while they stay the same."""
    cols = list(table.columns)
    out = [r"\begin{tabular}{" + "l" * len(cols) + "}", r"\toprule",
           " & ".join(_latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    previous: list[str] = []
    for row in table.itertuples(index=False):
        vals = [str(v) for v in row]
        shown = []
        same = True
        for i, v in enumerate(vals):
            same = same and i < 3 and i < len(previous) and previous[i] == v
            shown.append("" if same else (v if "$" in v else _latex_escape(v)))
        if previous and vals[0] != previous[0]:
            out.append(r"\midrule")
        out.append(" & ".join(shown) + r" \\")
        previous = vals
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def write_table(table: pd.DataFrame, out: Path, name: str, latex_table: pd.DataFrame | None = None) -> list[Path]:
    """name.csv (the table as shown), name.md, name.tex."""
    paths = [out / f"{name}.csv", out / f"{name}.md", out / f"{name}.tex"]
    table.to_csv(paths[0], index=False)
    paths[1].write_text(to_markdown(table))
    paths[2].write_text(to_latex(latex_table if latex_table is not None else table))
    return paths


# -- environments ----------------------------------------------------------------------------

def _env_value(key: str, value: Any) -> str:
    if value is None:
        return "none"
    if key == "git_commit":
        return str(value)[:10]
    if key == "git_dirty":
        return "dirty" if value else "clean"
    return str(value)


def _runs_phrase(names: list[str], named: bool = True, show: int = 5) -> str:
    """"5 runs" or "1 run: name"; beyond `show` names the rest is counted, not listed."""
    count = f"{len(names)} run{'s' if len(names) != 1 else ''}"
    if not named:
        return count
    listed = ", ".join(names[:show]) + (f", and {len(names) - show} more" if len(names) > show else "")
    return f"{count}: {listed}"


def environment_notes(collection: Collection) -> list[str]:
    """One line per compared env.json field (`mlbreg.env.COMPARED_FIELDS`) whose value is not
    the same in every included run, the values by how many runs have them; a line for included
    runs without env.json and one per run resumed under another environment. [] when all agree."""
    from .env import COMPARED_FIELDS, differing

    runs = collection.runs
    ok = runs[runs["included"].astype(bool)]
    envs = {row.run: collection.envs.get(row.path) for row in ok.itertuples()}
    present = {name: env for name, env in envs.items() if env is not None}
    lines = []
    for key, values in differing(present).items():
        ordered = sorted(values.items(), key=lambda item: (-len(item[1]), _env_value(key, item[0])))
        # the runs that stand out are named; the most common value is only counted
        lines.append(f"environments differ: {key} " + " vs ".join(
            f"{_env_value(key, value)} ({_runs_phrase(sorted(names), named=i > 0)})"
            for i, (value, names) in enumerate(ordered)))
    missing = sorted(name for name, env in envs.items() if env is None)
    if missing:
        lines.append(f"no env.json: {_runs_phrase(missing)} (not compared)")
    for name, env in present.items():
        attempts = [e for e in env.get("earlier") or [] if isinstance(e, dict)] + [env]
        changed = [k for k in COMPARED_FIELDS if len({json.dumps(e.get(k), default=str) for e in attempts}) > 1]
        if len(attempts) > 1 and changed:
            lines.append(f"resumed under another environment: {name} (" + ", ".join(
                f"{k} {' -> '.join(_env_value(k, e.get(k)) for e in attempts)}" for k in changed) + ")")
    return lines


# -- mask pictures ---------------------------------------------------------------------------

@dataclass
class LayerMask:
    """Which weights of one prunable layer are non-zero, as drawn.

    `image[i, j]` is the fraction of non-zero weights in cell (i, j): a cell is one weight of
    a linear layer (out x in) or one kernel of a conv layer (out_channels x in_channels),
    and a block of `block` cells where the layer is larger than the picture. 0 exactly
    where every weight of the cell is zero (an empty kernel)."""
    layer: str
    kind: str                 # "conv" | "linear"
    shape: tuple[int, ...]
    image: np.ndarray
    block: tuple[int, int]    # cells per pixel (rows, columns); (1, 1): not downsampled
    density: float            # non-zero weights / all weights
    empty: int                # empty kernels (conv) or zero weights (linear)
    cells: int                # kernels (conv) or weights (linear)


def _block_mean(values: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """Mean over blocks of `block` cells; the last, partial blocks average their real cells only."""
    if block == (1, 1):
        return values
    (rows, cols), (br, bc) = values.shape, block
    pr, pc = -rows % br, -cols % bc
    padded = np.pad(values, ((0, pr), (0, pc)))
    real = np.pad(np.ones_like(values), ((0, pr), (0, pc)))
    shape = (padded.shape[0] // br, br, padded.shape[1] // bc, bc)
    return padded.reshape(shape).sum(axis=(1, 3)) / real.reshape(shape).sum(axis=(1, 3))


def mask_image(name: str, weight, max_side: int = 256) -> LayerMask:
    """The picture of one Conv2d (4-d) or Linear (2-d) weight; sides above `max_side` cells
    are averaged over blocks so that a ResNet's 512x512 kernels still fit a panel."""
    import torch
    w = torch.as_tensor(weight).detach().cpu()
    nonzero = w != 0
    if w.dim() == 4:
        cells = nonzero.flatten(2).double().mean(-1).numpy()
        kind, empty = "conv", int((~nonzero.flatten(2).any(-1)).sum())
    elif w.dim() == 2:
        cells = nonzero.double().numpy()
        kind, empty = "linear", int((~nonzero).sum())
    else:
        raise ValueError(f"{name}: a {w.dim()}-d weight is neither a conv nor a linear layer")
    block = tuple(max(1, math.ceil(side / max_side)) for side in cells.shape)
    return LayerMask(layer=name, kind=kind, shape=tuple(w.shape), image=_block_mean(cells, block), block=block,
                     density=float(nonzero.double().mean()), empty=empty, cells=cells.size)


def mask_images(model_file: Path, max_side: int = 256) -> list[LayerMask]:
    """Every prunable weight of a run's model.pt, in the model's order.

    model.pt is the trainer's dense state_dict; the prunable layers (Conv2d, Linear) are
    exactly its 4-d and 2-d `.weight` tensors (BN weights are 1-d)."""
    import torch
    state = torch.load(model_file, map_location="cpu", weights_only=True)
    return [mask_image(key[:-len(".weight")], t, max_side) for key, t in state.items()
            if key.endswith(".weight") and getattr(t, "dim", lambda: 0)() in (2, 4)]


@dataclass
class MaskRun:
    """One configuration's mask picture: the configuration, the run drawn, its layers."""
    config: dict[str, Any]    # its row of the aggregated frame
    run: str
    path: str
    masks: list[LayerMask]


def mask_runs(collection: Collection, agg: pd.DataFrame, limit: int = 4,
              max_side: int = 256) -> tuple[list[MaskRun], list[str]]:
    """Up to `limit` configurations per (dataset, model) -> the masks of one run each, and notes
    on configurations that had no readable model.pt.

    Order: one configuration per method first (`representatives`), then the rest in table
    order; dense configurations (sparsity 0, e.g. SGD) have nothing to show and are skipped.
    The run drawn is the configuration's included run with the lowest seed that has model.pt."""
    if agg.empty or limit <= 0:
        return [], []
    runs = collection.runs[collection.runs["included"].astype(bool)]
    chosen, notes = [], []
    for _, block in agg.groupby(["dataset", "model"], sort=False):
        block = block[block["sparsity_pct_mean"].fillna(0) > 0]
        if block.empty:
            continue
        first = representatives(block)
        order = list(first.index) + [i for i in block.index if i not in set(first.index)]
        drawn = 0
        for i in order:
            if drawn >= limit:
                break
            conf = block.loc[i]
            candidates = runs[runs["config_id"] == conf["config_id"]].sort_values("seed", kind="stable")
            for run in candidates.itertuples():
                model_file = Path(run.path) / "model.pt"
                if not model_file.exists():
                    continue
                try:
                    masks = mask_images(model_file, max_side)
                except Exception as err:  # noqa: BLE001 - an unreadable model.pt is one picture less
                    notes.append(f"{run.run}: model.pt unreadable ({type(err).__name__}: {err})")
                    continue
                chosen.append(MaskRun(config=conf.to_dict(), run=run.run, path=run.path, masks=masks))
                drawn += 1
                break
            else:
                label = f"{METHOD_LABELS.get(conf['method'], conf['method'])} {conf['setting'] or ''}".strip()
                notes.append(f"no mask picture for {label} ({conf['dataset']}/{conf['model']}): "
                             f"none of its runs has model.pt")
    return chosen, notes


# -- the command -----------------------------------------------------------------------------

def excluded_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs.loc[~runs["included"].astype(bool), ["run", "status", "reason"]].reset_index(drop=True)


def write_report(collection: Collection, out: Path, plots: bool = True, dpi: int = 150,
                 masks: int = 4) -> dict[str, list[Path]]:
    """All tables and plots of `collection` into `out`; returns the written files by kind.
    `masks`: mask pictures for up to that many configurations per (dataset, model)."""
    out.mkdir(parents=True, exist_ok=True)
    runs, metrics = collection.runs, collection.metrics
    agg = aggregate(runs)
    layer_agg = aggregate_layers(collection.layers, runs, agg)
    written: dict[str, list[Path]] = {"data": [], "tables": [], "plots": []}
    runs.to_csv(out / "runs.csv", index=False)
    metrics.to_csv(out / "metrics.csv", index=False)
    collection.layers.to_csv(out / "layer_epochs.csv", index=False)
    excluded = excluded_runs(runs)
    excluded.to_csv(out / "excluded.csv", index=False)
    written["data"] += [out / "runs.csv", out / "metrics.csv", out / "layer_epochs.csv", out / "excluded.csv"]
    sections = [f"# mlbreg report\n\n{int(runs['included'].sum())} of {len(runs)} runs included "
                f"(finished, every epoch in metrics.csv); values are mean ± std (ddof=1) over the n seeds.\n"]
    env_lines = environment_notes(collection)
    if env_lines:
        sections.append("## Environments\n\n" + "\n".join(f"- {line}" for line in env_lines) + "\n")
    if not agg.empty:
        agg.to_csv(out / "aggregate.csv", index=False)
        written["data"].append(out / "aggregate.csv")
        tables = [("results", "Results (Table 1)", results_table(agg), results_table(agg, latex=True))]
        mask = mask_init_table(agg)
        if mask is not None:
            tables.append(("mask_init", "Mask initialization (Table 2)", mask, mask_init_table(agg, latex=True)))
        cpu = cpu_time_table(agg)
        if cpu is not None:
            tables.append(("cpu_time", "Training time split (Figure 2)", cpu, None))
        for name, title, table, latex in tables:
            written["tables"] += write_table(table, out, name, latex)
            sections.append(f"## {title}\n\n{to_markdown(table)}")
        layer_table = layers_table(layer_agg)
        if layer_table is not None:
            # layers.csv holds the numbers (means, stds, counts); .md and .tex the formatted table
            paths = [out / "layers.csv", out / "layers.md", out / "layers.tex"]
            layer_agg.to_csv(paths[0], index=False)
            paths[1].write_text(to_markdown(layer_table))
            paths[2].write_text(to_latex(layers_table(layer_agg, latex=True)))
            written["tables"] += paths
            sections.append(f"## Per-layer density (final epoch)\n\n{to_markdown(layer_table)}")
    if len(excluded):
        sections.append(f"## Excluded runs ({len(excluded)})\n\n{to_markdown(excluded)}")
    if plots:
        from .plots import make_plots   # matplotlib only when plotting
        drawn, notes = mask_runs(collection, agg, masks)
        written["plots"] = make_plots(agg, metrics, out, dpi=dpi, layers=collection.layers, layer_agg=layer_agg,
                                      masks=drawn)
        pngs = [p for p in written["plots"] if p.suffix == ".png"]
        if pngs:
            sections.append("## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")
        if notes:
            sections.append("## Mask pictures not drawn\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    (out / "report.md").write_text("\n".join(sections))
    written["data"].append(out / "report.md")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mlbreg report",
        description="Tables (CSV, Markdown, LaTeX) and plots (PNG, PDF) from run or sweep directories. "
                    "Unfinished, diverged and failed runs are listed and left out of the means.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run or sweep directories (searched recursively)")
    parser.add_argument("--out", metavar="OUTDIR", help="where to write (default: DIR/report of the first DIR)")
    parser.add_argument("--sweep", action="append", default=[], metavar="OVERRIDES",
                        help="only the runs of `mlbreg train -m OVERRIDES` (one quoted string, e.g. "
                             "'+experiment=table1_resnet18'); runs it makes that are not found are listed as "
                             "missing. Repeat for several sweeps.")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--dpi", type=int, default=150, help="resolution of the PNG plots (default 150)")
    parser.add_argument("--masks", type=int, default=4, metavar="N",
                        help="mask pictures (model.pt of one run per configuration) for up to N sparse "
                             "configurations per dataset and architecture, one per method first (default 4; 0: none)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    try:
        collection = collect(args.dirs, args.sweep)
    except ReportError as err:
        print(f"mlbreg report: {err}", file=sys.stderr)
        return 2
    written = write_report(collection, out, plots=not args.no_plots, dpi=args.dpi, masks=args.masks)
    runs = collection.runs
    print(f"{len(runs)} runs, {int(runs['included'].sum())} included in the tables and plots"
          + (f" ({collection.ignored} other runs under {', '.join(args.dirs)} are not in --sweep)"
             if collection.ignored else ""))
    excluded = excluded_runs(runs)
    if len(excluded):
        print(f"excluded from the means ({len(excluded)}):")
        for row in excluded.itertuples(index=False):
            detail = row.reason if row.reason and row.reason != row.status else ""
            print(f"  {row.run}  [{row.status}]  {detail}".rstrip())
    for line in environment_notes(collection):
        print(line)
    results = out / "results.md"
    if results.exists():
        print("\n" + results.read_text())
    else:
        print("no finished run: no tables or plots")
    count = sum(len(v) for v in written.values())
    print(f"wrote {count} files to {out}/ (report.md shows the tables and plots)")
    return 0
