"""Which configuration a run belongs to, and how a table names it.

A configuration is the run's identifying config (`mlbreg.config.identity`) without the
seed, after blanking the keys its method does not read (`Method.unused_keys`); its
"Setting" shows the method's main keys (`Method.main_keys`) and the keys that vary.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from ..labels import KEY_LABELS


def unused_keys(method: str) -> tuple[str, ...]:
    """The dotted config keys `method` does not read; () for a method mlbreg no longer has
    (a run directory from an older version)."""
    from ..methods import METHODS, method_class

    return method_class(method).unused_keys if method in METHODS else ()


def main_keys(method: str) -> tuple[str, ...]:
    """The hyperparameters `method`'s rows are about (always shown, the x of its curve in Figure 1)."""
    from ..methods import METHODS, method_class

    return method_class(method).main_keys if method in METHODS else ()


def config_id(method: str, ident: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The configuration a run belongs to: its identity without seed and unused keys."""
    from ..config import digest

    unused = unused_keys(method)
    key = {k: v for k, v in ident.items() if k != "seed" and k not in unused}
    return digest(key, 10), key


def mark_duplicates(runs: pd.DataFrame) -> pd.DataFrame:
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


def settings(runs: pd.DataFrame) -> list[str]:
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
        main = list(main_keys(str(block["method"].iloc[0])))
        shown = main + [k for k in varying if k not in main and k not in ("dataset.name", "model.name", "method.name")]
        for i in block.index:
            key = runs.at[i, "_key"]
            if not isinstance(key, dict):
                continue
            parts = [f"{KEY_LABELS.get(k, k)}={_fmt_value(k, key[k])}" for k in shown if k in key]
            labels[runs.index.get_loc(i)] = ", ".join(parts)
    return labels
