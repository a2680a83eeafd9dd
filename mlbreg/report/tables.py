"""The report's tables as frames (Table 1 results, Table 2 mask initialization, per-layer
density, Figure 2's time split), and a table as CSV, Markdown and LaTeX (booktabs)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..labels import DATASET_LABELS, INIT_LABELS, METHOD_LABELS, MODEL_LABELS, TIME_PARTS


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
    """Whether a convolutional sparsity column means anything: some model has conv layers (a model
    without any has no conv sparsity: nan in metrics.csv)."""
    return "conv_sparsity_pct_mean" in agg and bool(agg["conv_sparsity_pct_mean"].notna().any())


def _config_columns(frame: pd.DataFrame) -> dict[str, pd.Series]:
    """The columns that name a configuration: dataset, architecture, method, setting, n."""
    return {
        "Dataset": frame["dataset"].map(lambda v: DATASET_LABELS.get(v, v)),
        "Architecture": frame["model"].map(lambda v: MODEL_LABELS.get(v, v)),
        "Method": frame["method"].map(lambda v: METHOD_LABELS.get(v, v)),
        "Setting": frame["setting"].fillna(""),
        "n": frame["n"],
    }


def results_table(agg: pd.DataFrame, latex: bool = False) -> pd.DataFrame:
    """Table 1: architecture, method, setting -> n, sparsity and test accuracy (mean ± std)."""
    table = pd.DataFrame(
        {
            **_config_columns(agg),
            "Sparsity (%)": [_pm(m, s, latex=latex) for m, s in zip(agg["sparsity_pct_mean"], agg["sparsity_pct_std"])],
            "Test acc (%)": [_pm(m, s, latex=latex) for m, s in zip(agg["test_acc_pct_mean"], agg["test_acc_pct_std"])],
        }
    )
    if _has_conv(agg):
        table["Conv. sparsity (%)"] = [
            _pm(m, s, latex=latex) for m, s in zip(agg["conv_sparsity_pct_mean"], agg["conv_sparsity_pct_std"])
        ]
    table["Train FLOPs (% of SGD)"] = [
        _pct(m, s, latex) for m, s in zip(agg["train_flops_vs_sgd_mean"], agg["train_flops_vs_sgd_std"])
    ]
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
    text = f"{n / 1000**k:.3g}"
    if float(text) >= 1000 and k + 1 < len(units):  # 999.7 kB rounds to "1e+03": the next unit
        k += 1
        text = f"{n / 1000**k:.3g}"
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

    return pd.DataFrame(
        {
            "Dataset": sub["dataset"].map(lambda v: DATASET_LABELS.get(v, v)),
            "Architecture": sub["model"].map(lambda v: MODEL_LABELS.get(v, v)),
            "Method": sub["method"].map(lambda v: METHOD_LABELS.get(v, v)),
            "Mask initialization": sub["init"].map(lambda v: INIT_LABELS.get(v, v)),
            "Setting": [other(s, i) for s, i in zip(sub["setting"], sub["init"])],
            "n": sub["n"],
            "Sparsity (%)": [_pm(m, s, 3, latex) for m, s in zip(sub["sparsity_pct_mean"], sub["sparsity_pct_std"])],
            "Test acc (%)": [_pm(m, s, 3, latex) for m, s in zip(sub["test_acc_pct_mean"], sub["test_acc_pct_std"])],
        }
    ).reset_index(drop=True)


def layers_table(layer_agg: pd.DataFrame, latex: bool = False) -> pd.DataFrame | None:
    """Per configuration and layer at the final epoch: density (%), non-zeros and (convs)
    empty kernels, mean ± std over seeds."""
    if layer_agg.empty:
        return None
    table = pd.DataFrame(
        {
            **_config_columns(layer_agg),
            "Layer": layer_agg["layer"],
            "Shape": layer_agg["shape"].fillna(""),
            "Density (%)": [
                _pm(100 * m, 100 * s if not pd.isna(s) else s, latex=latex)
                for m, s in zip(layer_agg["density_mean"], layer_agg["density_std"])
            ],
            "Non-zeros": [
                f"{m:,.0f} / {t:,.0f}" if not pd.isna(m) and not pd.isna(t) else "–"
                for m, t in zip(layer_agg["nonzeros_mean"], layer_agg["numel"])
            ],
        }
    )
    if (layer_agg["kind"] == "conv").any():
        table["Empty kernels"] = [
            f"{m:,.1f} / {t:,.0f}" if k == "conv" and not pd.isna(m) else ""
            for k, m, t in zip(layer_agg["kind"], layer_agg["zero_kernels_mean"], layer_agg["kernels"])
        ]
    return table


def cpu_time_table(agg: pd.DataFrame) -> pd.DataFrame | None:
    """Figure 2 as numbers: training seconds (summed over epochs) split by phase, per configuration."""
    if "time_train_s_mean" not in agg or agg["time_train_s_mean"].isna().all():
        return None
    table = pd.DataFrame(
        {
            "Dataset": agg["dataset"].map(lambda v: DATASET_LABELS.get(v, v)),
            "Architecture": agg["model"].map(lambda v: MODEL_LABELS.get(v, v)),
            "Method": agg["method"].map(lambda v: METHOD_LABELS.get(v, v)),
            "Setting": agg["setting"].fillna(""),
            "Backend": agg["backend"],
            "Precision": agg["precision"] if "precision" in agg else "fp32",
            "Device": agg["device"],
            "Epochs": agg["epochs"],
            "n": agg["n"],
        }
    )
    columns = [("time_train_s", "Train (s)")] + [(c, f"{n.split(' (')[0].capitalize()} (s)") for c, n in TIME_PARTS]
    for col, name in columns:
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
    out = [
        r"\begin{tabular}{" + "l" * len(cols) + "}",
        r"\toprule",
        " & ".join(_latex_escape(c) for c in cols) + r" \\",
        r"\midrule",
    ]
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
