"""The report's plots (matplotlib, Agg): one file per figure and (dataset, architecture), PNG + PDF.

Each function takes the aggregated frame of `mlbreg.report.aggregate.aggregate` (one row per
configuration: `<metric>_mean`, `<metric>_std` over seeds, n) and returns the files it wrote:

- accuracy_vs_sparsity_<dataset>_<model>  Figures 1 / 6: test accuracy against sparsity per method
- ablation_lambda_<dataset>_<model>       Figure 4a: accuracy and sparsity against λ
- ablation_m_<dataset>_<model>            Figure 4b: accuracy and sparsity against m
- training_curves_<dataset>_<model>       Figure 5: test accuracy, sparsity, train loss per epoch
- train_flops_<dataset>_<model>           Appendix C: theoretical training FLOPs relative to SGD
- cpu_time_<dataset>_<model>              Figure 2: training time split by phase
- layer_density_<dataset>_<model>         density of each prunable layer at the final epoch, per configuration
- layer_density_epochs_<dataset>_<model>  heatmaps layer x epoch, one configuration per method
- masks_<dataset>_<model>_<method>_<run>  which weights / conv kernels of one run are non-zero

The per-layer plots (`mlbreg.report.layer_plots`) also take the per-layer frames of
`mlbreg.report.aggregate` (`aggregate_layers`, the collection's layers frame), the mask
pictures the `MaskRun`s of `mlbreg.report.masks` (arrays made from model.pt there: no plot
module reads a file). Error bars and bands are ± one standard deviation over seeds (ddof=1).
Shared set-up, titles and colours: `mlbreg.report.plot_style`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ..labels import KEY_LABELS, METHOD_COLORS, METHOD_LABELS, TIME_PARTS
from .aggregate import representatives as _representatives
from .layer_plots import plot_layer_density, plot_layer_density_epochs, plot_masks
from .plot_style import _legend, _plt, _save, _series_label, _title

CURVES = [
    ("test_acc_pct", "Test accuracy (%)", False),
    ("sparsity_pct", "Sparsity (%)", False),
    ("train_loss", "Train loss (cross-entropy)", True),
]


def _series(block: pd.DataFrame, drop_keys: list[str]) -> dict[tuple[str, str], pd.DataFrame]:
    """Configurations of one (dataset, model) -> series: same method and setting except `drop_keys`."""
    labels = [KEY_LABELS.get(k, k) for k in drop_keys]
    out: dict[tuple[str, str], list[int]] = {}
    for i, row in block.iterrows():
        key = (row["method"], _series_label(row["method"], row["setting"], labels))
        out.setdefault(key, []).append(i)
    return {k: block.loc[v] for k, v in out.items()}


def plot_accuracy_vs_sparsity(agg: pd.DataFrame, out: Path) -> list[Path]:
    """Figure 1 / 6: test accuracy against sparsity, per method, error bars = std over seeds."""
    plt = _plt()
    paths = []
    for (dataset, model), block in agg.groupby(["dataset", "model"], sort=False):
        fig, ax = plt.subplots(figsize=(7, 4.6))
        for (method, label), series in _series(block, ["lam", "sparsity"]).items():
            color = METHOD_COLORS.get(method)
            series = series.sort_values("sparsity_pct_mean")
            x, y = series["sparsity_pct_mean"], series["test_acc_pct_mean"]
            if method == "sgd":
                mean, std = y.iloc[0], series["test_acc_pct_std"].iloc[0]
                ax.axhline(mean, color=color, ls="--", lw=1.2, label=f"{label} (dense, {x.iloc[0]:.0f}% sparse)")
                if not pd.isna(std):
                    ax.axhspan(mean - std, mean + std, color=color, alpha=0.12, lw=0)
                continue
            n = int(series["n"].min())
            ax.errorbar(
                x,
                y,
                xerr=series["sparsity_pct_std"].fillna(0),
                yerr=series["test_acc_pct_std"].fillna(0),
                marker="o",
                ms=5,
                capsize=3,
                lw=1.2,
                color=color,
                label=f"{label}, n={n}",
                ls="-" if len(series) > 1 else "none",
            )
        ax.set_xlabel("Sparsity of the prunable weights (%)")
        ax.set_ylabel("Test accuracy (%)")
        ax.set_title(f"{_title(dataset, model)}: accuracy vs sparsity (mean ± std over seeds)")
        _legend(ax, loc="lower left")
        paths += _save(fig, out, f"accuracy_vs_sparsity_{dataset}_{model}")
    return paths


def plot_ablation(agg: pd.DataFrame, out: Path, key: str, column: str, xlabel: str, name: str) -> list[Path]:
    """Figure 4: test accuracy and sparsity against one hyperparameter (λ or m), the rest fixed."""
    plt = _plt()
    paths = []
    for (dataset, model), block in agg.groupby(["dataset", "model"], sort=False):
        block = block[block[column].notna()]
        groups = {k: s for k, s in _series(block, [key]).items() if s[column].nunique() > 1}
        if not groups:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        one_per_method = len(groups) == len({method for method, _ in groups})
        for (method, label), series in groups.items():
            series = series.sort_values(column)
            style = dict(
                marker="o", ms=5, capsize=3, lw=1.2, label=label, color=METHOD_COLORS.get(method) if one_per_method else None
            )
            axes[0].errorbar(series[column], series["test_acc_pct_mean"], yerr=series["test_acc_pct_std"].fillna(0), **style)
            axes[1].errorbar(series[column], series["sparsity_pct_mean"], yerr=series["sparsity_pct_std"].fillna(0), **style)
        plotted = pd.concat(groups.values())
        values = sorted(plotted[column].unique())
        for ax, ylabel in zip(axes, ["Test accuracy (%)", "Sparsity (%)"]):
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if len(values) <= 10:
                ax.set_xticks(values)
                ax.set_xticklabels([f"{v:g}" for v in values])
                ax.minorticks_off()
        n = int(plotted["n"].min())
        fig.suptitle(
            f"{_title(dataset, model)}: {xlabel.split(' (')[0]} ablation (mean ± std over {n} seed{'s' if n != 1 else ''})"
        )
        _legend(axes[0], loc="best")
        fig.tight_layout()
        paths += _save(fig, out, f"{name}_{dataset}_{model}")
    return paths


def _curves_figure(configs: pd.DataFrame, ok: pd.DataFrame, title: str, by_method: bool):
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, (_, conf) in enumerate(configs.iterrows()):
        rows = ok[ok["config_id"] == conf["config_id"]]
        if rows.empty:
            continue
        label = _series_label(conf["method"], conf["setting"], [])
        color = METHOD_COLORS.get(conf["method"]) if by_method else cmap(0.9 * i / max(1, len(configs) - 1))
        for ax, (col, _ylabel, logy) in zip(axes, CURVES):
            stats = rows.groupby("epoch")[col].agg(["mean", "std"]).reset_index()
            ax.plot(stats["epoch"], stats["mean"], color=color, lw=1.3, label=label)
            if stats["std"].notna().any():
                low = stats["mean"] - stats["std"].fillna(0)
                if logy:  # a band below zero cannot be drawn on a log axis: clip it at 5% of the mean
                    low = np.maximum(low, 0.05 * stats["mean"])
                ax.fill_between(stats["epoch"], low, stats["mean"] + stats["std"].fillna(0), color=color, alpha=0.18, lw=0)
    for ax, (_col, ylabel, logy) in zip(axes, CURVES):
        ax.set_xlabel("Epoch")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
    n = int(configs["n"].min())
    fig.suptitle(f"{title} (mean ± std over {n} seed{'s' if n != 1 else ''})")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        rows_of_legend = math.ceil(len(labels) / 4)
        fig.legend(
            handles,
            labels,
            loc="lower center",
            ncol=min(4, len(labels)),
            frameon=False,
            bbox_to_anchor=(0.5, -0.02 - 0.045 * rows_of_legend),
        )
    fig.tight_layout()
    return fig


def plot_training_curves(agg: pd.DataFrame, metrics: pd.DataFrame, out: Path, max_lines: int = 8) -> list[Path]:
    """Figure 5: test accuracy, sparsity and train loss per epoch, mean ± std band over seeds.

    Up to `max_lines` configurations share one figure. Beyond that, training_curves_<d>_<m>
    shows one configuration per method (`_representatives`) and training_curves_<d>_<m>_<method>
    every configuration of one method."""
    paths = []
    ok = metrics[metrics["included"].astype(bool)]
    for (dataset, model), block in agg.groupby(["dataset", "model"], sort=False):
        title = f"{_title(dataset, model)}: training curves"
        name = f"training_curves_{dataset}_{model}"
        if len(block) <= max_lines:
            by_method = block["method"].nunique() == len(block)
            paths += _save(_curves_figure(block, ok, title, by_method), out, name)
            continue
        paths += _save(_curves_figure(_representatives(block), ok, f"{title}, one configuration per method", True), out, name)
        for method, group in block.groupby("method", sort=False):
            if len(group) > 1:
                label = METHOD_LABELS.get(method, method)
                paths += _save(_curves_figure(group.head(12), ok, f"{title}, {label}", False), out, f"{name}_{method}")
    return paths


def _bar_labels(block: pd.DataFrame) -> list[str]:
    return [_series_label(m, s, []) for m, s in zip(block["method"], block["setting"])]


def plot_train_flops(agg: pd.DataFrame, out: Path) -> list[Path]:
    """Appendix C: theoretical training FLOPs relative to SGD (3·f_D per sample and step)."""
    plt = _plt()
    paths = []
    for (dataset, model), block in agg.groupby(["dataset", "model"], sort=False):
        block = block[block["train_flops_vs_sgd_mean"].notna()]
        if block.empty:
            continue
        labels = _bar_labels(block)
        fig, ax = plt.subplots(figsize=(8, 0.9 + 0.32 * len(block)))
        y = np.arange(len(block))[::-1]
        values = 100 * block["train_flops_vs_sgd_mean"].to_numpy()
        errors = 100 * block["train_flops_vs_sgd_std"].fillna(0).to_numpy()
        colors = [METHOD_COLORS.get(m, "tab:gray") for m in block["method"]]
        ax.barh(y, values, xerr=errors, color=colors, alpha=0.85, capsize=2)
        for yi, v, e in zip(y, values, errors):
            ax.text(v + e + max(values) * 0.01, yi, f"{v:.1f}%", va="center", fontsize=8)
        ax.axvline(100, color="0.25", ls="--", lw=1)
        ax.set_yticks(y)
        ax.set_yticklabels(labels)
        ax.set_xlim(0, max(105, values.max() * 1.12))
        ax.set_xlabel("Theoretical training FLOPs (% of dense SGD, RigL FLOP model)")
        ax.set_title(f"{_title(dataset, model)}: training FLOPs relative to SGD")
        ax.grid(axis="y", visible=False)
        paths += _save(fig, out, f"train_flops_{dataset}_{model}")
    return paths


def plot_cpu_time(agg: pd.DataFrame, out: Path) -> list[Path]:
    """Figure 2: measured training time split into forward, backward, optimizer step, swaps, rest."""
    plt = _plt()
    paths = []
    if "time_train_s_mean" not in agg:
        return paths
    for (dataset, model), block in agg.groupby(["dataset", "model"], sort=False):
        block = block[block["time_train_s_mean"].notna()]
        if block.empty:
            continue
        precision = block["precision"] if "precision" in block else pd.Series(["fp32"] * len(block), index=block.index)
        labels = [
            f"{lab} [{b}{'' if p in (None, 'fp32') or pd.isna(p) else ', ' + str(p)}"
            f"{'' if d in (None, 'auto') or pd.isna(d) else ', ' + str(d)}]"
            for lab, b, p, d in zip(_bar_labels(block), block["backend"], precision, block["device"])
        ]
        fig, ax = plt.subplots(figsize=(9, 1.2 + 0.34 * len(block)))
        y = np.arange(len(block))[::-1]
        left = np.zeros(len(block))
        colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "0.7"]
        for (col, name), color in zip(TIME_PARTS, colors):
            values = block.get(f"{col}_mean", pd.Series(np.zeros(len(block)))).fillna(0).to_numpy()
            ax.barh(y, values, left=left, color=color, label=name)
            left += values
        for yi, total in zip(y, block["time_train_s_mean"]):
            ax.text(total * 1.01, yi, f"{total:.3g} s", va="center", fontsize=8)
        ax.set_yticks(y)
        ax.set_yticklabels(labels)
        ax.set_xlim(0, left.max() * 1.15 if left.max() > 0 else 1)
        ax.set_xlabel("Training time (s, summed over all epochs; mean over seeds)")
        ax.grid(axis="y", visible=False)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=5, frameon=False)
        ax.set_title(f"{_title(dataset, model)}: where the training time goes", pad=22)
        paths += _save(fig, out, f"cpu_time_{dataset}_{model}")
    return paths


def make_plots(
    agg: pd.DataFrame,
    metrics: pd.DataFrame,
    out: Path,
    dpi: int = 150,
    layers: pd.DataFrame | None = None,
    layer_agg: pd.DataFrame | None = None,
    masks: Iterable = (),
) -> list[Path]:
    """Every plot the runs allow (an ablation plot needs a series with two values of its key;
    the per-layer plots need layers.csv, the mask pictures model.pt)."""
    if agg.empty:
        return []
    _plt().rcParams["savefig.dpi"] = dpi
    paths = plot_accuracy_vs_sparsity(agg, out)
    paths += plot_ablation(agg, out, "lam", "lam", "λ (regularization strength)", "ablation_lambda")
    paths += plot_ablation(agg, out, "m", "m", "m (steps per cycle; m = 1 is LinBreg)", "ablation_m")
    paths += plot_training_curves(agg, metrics, out)
    paths += plot_train_flops(agg, out)
    paths += plot_cpu_time(agg, out)
    paths += plot_layer_density(layer_agg, agg, out)
    paths += plot_layer_density_epochs(layers, agg, out)
    paths += plot_masks(list(masks), out)
    return paths
