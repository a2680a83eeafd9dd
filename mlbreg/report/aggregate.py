"""Included runs -> one row per configuration (mean, std with ddof=1, n over seeds), and the
per-layer frames -> one row per configuration and prunable layer at the final epoch."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..labels import DATASET_LABELS, INIT_LABELS, METHOD_ORDER, MODEL_LABELS
from .collect import CANONICAL, FINAL_METRICS, TIME_COLUMNS
from .configs import unused_keys

AGG_METRICS = FINAL_METRICS + list(TIME_COLUMNS.values()) + ["time_other_s"]
DESCRIBE = [
    "dataset",
    "model",
    "method",
    "setting",
    "regularizer",
    "lam",
    "m",
    "init",
    "density",
    "target_sparsity",
    "backend",
    "precision",
    "lr",
    "epochs",
    "device",
]


def _rank(values: pd.Series, order: list[str]) -> pd.Series:
    return values.map(lambda v: order.index(v) if v in order else len(order))


def _setting_key(setting) -> list[tuple]:
    """A "Setting" cell as a sort key with its numbers as numbers: epochs=5 < 20 < 200, target=90% < 95%."""
    key = []
    for part in str(setting if isinstance(setting, str) else "").split(", "):
        name, _, value = part.partition("=")
        try:
            key.append((name, 0, float(value.rstrip("%")), ""))
        except ValueError:
            key.append((name, 1, 0.0, value))
    return key


def _setting_rank(settings: pd.Series) -> pd.Series:
    order = {s: i for i, s in enumerate(sorted(set(settings.fillna("")), key=_setting_key))}
    return settings.fillna("").map(order)


def _aggregate_config(config_id: str, group: pd.DataFrame) -> dict:
    """One configuration's runs -> its row: description (unused keys blanked), n, seeds, statistics."""
    first = group.iloc[0]
    unused = unused_keys(first["method"])
    row = {"config_id": config_id}
    for col in DESCRIBE:
        row[col] = first.get(col)
    for col, key in CANONICAL.items():
        if key in unused:
            row[col] = None
    row["n"] = int(group["seed"].nunique())
    row["seeds"] = ",".join(str(s) for s in sorted(group["seed"].unique()))
    for metric in AGG_METRICS:
        if metric in group:
            values = pd.to_numeric(group[metric], errors="coerce")
            row[f"{metric}_mean"] = values.mean()
            row[f"{metric}_std"] = values.std(ddof=1) if values.count() > 1 else np.nan
    return row


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Included runs -> one row per configuration: `<metric>_mean`, `<metric>_std` (ddof=1), n, seeds."""
    ok = runs[runs["included"].astype(bool)]
    if ok.empty:
        return pd.DataFrame()
    agg = pd.DataFrame([_aggregate_config(config_id, group) for config_id, group in ok.groupby("config_id", sort=False)])
    order = {"dataset": list(DATASET_LABELS), "model": list(MODEL_LABELS), "method": METHOD_ORDER, "init": list(INIT_LABELS)}
    for col, values in order.items():
        agg[f"_{col}_rank"] = _rank(agg[col], values)
    agg["_setting_rank"] = _setting_rank(agg["setting"])
    sort = [
        "_dataset_rank",
        "dataset",
        "_model_rank",
        "model",
        "_method_rank",
        "lam",
        "target_sparsity",
        "m",
        "_init_rank",
        "_setting_rank",
    ]
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


def _aggregate_layer(conf: pd.Series, layer: str, group: pd.DataFrame) -> dict:
    """One configuration's rows of one layer -> its row: description, n, seeds, statistics."""
    first = group.iloc[0]
    row = dict(
        dataset=conf["dataset"],
        model=conf["model"],
        method=conf["method"],
        setting=conf["setting"],
        config_id=conf["config_id"],
        n=int(group["seed"].nunique()),
        seeds=",".join(str(s) for s in sorted(group["seed"].unique())),
        epoch=int(first["epoch"]),
        layer=layer,
        layer_index=int(first["layer_index"]),
        kind=first.get("kind"),
        shape=first.get("shape"),
        numel=first.get("numel"),
        kernels=first.get("kernels"),
    )
    for col in ("density", "nonzeros", "zero_kernels"):
        values = pd.to_numeric(group[col], errors="coerce") if col in group else pd.Series(dtype=float)
        row[f"{col}_mean"] = values.mean()
        row[f"{col}_std"] = values.std(ddof=1) if values.count() > 1 else np.nan
    return row


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
            out.append(_aggregate_layer(conf, layer, group))
    return pd.DataFrame(out)
