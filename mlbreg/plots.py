"""The report's plots (matplotlib, Agg): one file per figure and (dataset, architecture), PNG + PDF.

Each function takes the aggregated frame of `mlbreg.report.aggregate` (one row per
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

The per-layer plots also take the per-layer frames of `mlbreg.report` (`aggregate_layers`,
the collection's layers frame), the mask pictures its `MaskRun`s (arrays made from model.pt
there: this module reads no file). Error bars and bands are ± one standard deviation over
seeds (ddof=1).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from .report import DATASET_LABELS, KEY_LABELS, METHOD_COLORS, METHOD_LABELS, MODEL_LABELS, TIME_PARTS
from .report import representatives as _representatives

CURVES = [("test_acc_pct", "Test accuracy (%)", False), ("sparsity_pct", "Sparsity (%)", False),
          ("train_loss", "Train loss (cross-entropy)", True)]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3,
                         "font.size": 10, "legend.fontsize": 8, "axes.titlesize": 11})
    return plt


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, bbox_inches="tight")
    _plt().close(fig)
    return paths


def _title(dataset: str, model: str) -> str:
    return f"{MODEL_LABELS.get(model, model)} on {DATASET_LABELS.get(dataset, dataset)}"


def _series_label(method: str, setting: str, drop: Iterable[str]) -> str:
    parts = [p for p in str(setting).split(", ") if p and p.split("=")[0] not in set(drop)]
    label = METHOD_LABELS.get(method, method)
    return f"{label} ({', '.join(parts)})" if parts else label


def _series(block: pd.DataFrame, drop_keys: list[str]) -> dict[tuple[str, str], pd.DataFrame]:
    """Configurations of one (dataset, model) -> series: same method and setting except `drop_keys`."""
    labels = [KEY_LABELS.get(k, k) for k in drop_keys]
    out: dict[tuple[str, str], list[int]] = {}
    for i, row in block.iterrows():
        key = (row["method"], _series_label(row["method"], row["setting"], labels))
        out.setdefault(key, []).append(i)
    return {k: block.loc[v] for k, v in out.items()}


def _legend(ax, **kw) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(**kw)


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
            ax.errorbar(x, y, xerr=series["sparsity_pct_std"].fillna(0), yerr=series["test_acc_pct_std"].fillna(0),
                        marker="o", ms=5, capsize=3, lw=1.2, color=color, label=f"{label}, n={n}",
                        ls="-" if len(series) > 1 else "none")
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
            style = dict(marker="o", ms=5, capsize=3, lw=1.2, label=label,
                         color=METHOD_COLORS.get(method) if one_per_method else None)
            axes[0].errorbar(series[column], series["test_acc_pct_mean"], yerr=series["test_acc_pct_std"].fillna(0),
                             **style)
            axes[1].errorbar(series[column], series["sparsity_pct_mean"], yerr=series["sparsity_pct_std"].fillna(0),
                             **style)
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
        fig.suptitle(f"{_title(dataset, model)}: {xlabel.split(' (')[0]} ablation (mean ± std over {n} seed"
                     f"{'s' if n != 1 else ''})")
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
        color = (METHOD_COLORS.get(conf["method"]) if by_method else
                 cmap(0.9 * i / max(1, len(configs) - 1)))
        for ax, (col, ylabel, logy) in zip(axes, CURVES):
            stats = rows.groupby("epoch")[col].agg(["mean", "std"]).reset_index()
            ax.plot(stats["epoch"], stats["mean"], color=color, lw=1.3, label=label)
            if stats["std"].notna().any():
                low = stats["mean"] - stats["std"].fillna(0)
                if logy:   # a band below zero cannot be drawn on a log axis: clip it at 5% of the mean
                    low = np.maximum(low, 0.05 * stats["mean"])
                ax.fill_between(stats["epoch"], low, stats["mean"] + stats["std"].fillna(0), color=color,
                                alpha=0.18, lw=0)
    for ax, (col, ylabel, logy) in zip(axes, CURVES):
        ax.set_xlabel("Epoch")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
    n = int(configs["n"].min())
    fig.suptitle(f"{title} (mean ± std over {n} seed{'s' if n != 1 else ''})")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        rows_of_legend = math.ceil(len(labels) / 4)
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False,
                   bbox_to_anchor=(0.5, -0.02 - 0.045 * rows_of_legend))
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
        paths += _save(_curves_figure(_representatives(block), ok, f"{title}, one configuration per method", True),
                       out, name)
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
        labels = [f"{lab} [{b}{'' if d in (None, 'auto') or pd.isna(d) else ', ' + str(d)}]"
                  for lab, b, d in zip(_bar_labels(block), block["backend"], block["device"])]
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


def _config_colors(configs: pd.DataFrame) -> list:
    """Method colors when each method has one configuration, else a sequential map."""
    if configs["method"].nunique() == len(configs):
        return [METHOD_COLORS.get(m, "tab:gray") for m in configs["method"]]
    cmap = _plt().get_cmap("viridis")
    return [cmap(0.9 * i / max(1, len(configs) - 1)) for i in range(len(configs))]


def _percent_axis(axis, scale: float = 1.0) -> None:
    """Tick labels "0.1%", "1%", "10%" for values that are `scale` x a percentage."""
    from matplotlib.ticker import FuncFormatter
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{scale * v:g}%"))


def plot_layer_density(layer_agg: pd.DataFrame, agg: pd.DataFrame, out: Path, max_bars: int = 8) -> list[Path]:
    """Density of each prunable layer at the final epoch: one bar group per layer, one bar per
    configuration (beyond `max_bars` configurations, one per method), log scale, ± std over seeds."""
    plt = _plt()
    paths = []
    if layer_agg is None or layer_agg.empty:
        return paths
    for (dataset, model), block in agg.groupby(["dataset", "model"], sort=False):
        configs = block if len(block) <= max_bars else _representatives(block)
        rows = layer_agg[layer_agg["config_id"].isin(configs["config_id"])]
        if rows.empty:
            continue
        configs = configs[configs["config_id"].isin(rows["config_id"])]
        order = rows.groupby("layer")["layer_index"].min().sort_values()
        shapes = rows.groupby("layer")["shape"].first()
        x = np.arange(len(order))
        width = 0.8 / len(configs)
        fig, ax = plt.subplots(figsize=(min(16, max(7, 1.2 + len(order) * (0.3 + 0.13 * len(configs)))), 4.4))
        low = 100.0
        for k, ((_, conf), color) in enumerate(zip(configs.iterrows(), _config_colors(configs))):
            mine = rows[rows["config_id"] == conf["config_id"]].set_index("layer").reindex(order.index)
            mean = 100 * mine["density_mean"].to_numpy(dtype=float)
            std = 100 * mine["density_std"].fillna(0).to_numpy(dtype=float)
            positive = mean[mean > 0]
            if positive.size:
                low = min(low, positive.min())
            # a log axis cannot show a bar end at or below 0: the lower error stops at 10% of the bar
            yerr = np.vstack([np.minimum(std, 0.9 * mean), std])
            n = int(mine["n"].min())
            ax.bar(x - 0.4 + width * (k + 0.5), mean, width, yerr=yerr, capsize=2, color=color, alpha=0.9,
                   label=f"{_series_label(conf['method'], conf['setting'], [])}, n={n}", error_kw=dict(lw=0.8))
        ax.set_yscale("log")
        ax.set_ylim(10 ** math.floor(math.log10(low / 2)), 180)
        _percent_axis(ax.yaxis)
        ax.set_xticks(x)
        if len(order) <= 8:
            ax.set_xticklabels([f"{name}\n{shapes[name]}" for name in order.index])
        else:
            ax.set_xticklabels(order.index, rotation=60, ha="right")
        ax.set_ylabel("Density (non-zero weights, %)")
        ax.grid(axis="x", visible=False)
        epoch = int(rows["epoch"].max())
        more = "" if len(configs) == len(block) else ", one configuration per method"
        ax.set_title(f"{_title(dataset, model)}: density per layer after epoch {epoch}{more} (mean ± std over seeds)")
        _legend(ax, loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=min(3, len(configs)), frameon=False)
        paths += _save(fig, out, f"layer_density_{dataset}_{model}")
    return paths


def plot_layer_density_epochs(layers: pd.DataFrame, agg: pd.DataFrame, out: Path) -> list[Path]:
    """Density by layer and epoch as a heatmap, one panel per method (`_representatives`,
    dense configurations left out), the mean over the configuration's included seeds."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator
    plt = _plt()
    paths = []
    if layers is None or layers.empty or "included" not in layers:
        return paths
    ok = layers[layers["included"].fillna(False).astype(bool)]
    for (dataset, model), block in agg.groupby(["dataset", "model"], sort=False):
        configs = _representatives(block[block["sparsity_pct_mean"].fillna(0) > 0])
        grids = []
        for _, conf in configs.iterrows():
            rows = ok[ok["config_id"] == conf["config_id"]]
            if rows.empty:
                continue
            grid = rows.pivot_table(index=["layer_index", "layer"], columns="epoch", values="density", aggfunc="mean")
            grids.append((conf, grid.sort_index(), int(rows["seed"].nunique())))
        if not grids:
            continue
        positive = np.concatenate([g.to_numpy()[g.to_numpy() > 0] for _, g, _ in grids])
        vmin = 10 ** math.floor(math.log10(positive.min())) if positive.size else 1e-3
        cmap = plt.get_cmap("viridis").with_extremes(bad="black", under="black")
        heights = [0.8 + 0.22 * len(g) for _, g, _ in grids]
        fig, axes = plt.subplots(len(grids), 1, figsize=(9, sum(heights) + 0.6), squeeze=False,
                                 gridspec_kw=dict(height_ratios=heights), layout="constrained", sharex=True)
        for ax, (conf, grid, n) in zip(axes[:, 0], grids):
            epochs = grid.columns.to_numpy(dtype=float)
            values = np.ma.masked_less_equal(grid.to_numpy(dtype=float), 0)
            image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap,
                              norm=LogNorm(vmin=vmin, vmax=1),
                              extent=(epochs.min() - 0.5, epochs.max() + 0.5, len(grid) - 0.5, -0.5))
            ax.set_yticks(np.arange(len(grid)))
            ax.set_yticklabels([name for _, name in grid.index], fontsize=7 if len(grid) > 12 else 8)
            ax.grid(False)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{_series_label(conf['method'], conf['setting'], [])}, n={n}", fontsize=9, loc="left")
        axes[-1, 0].set_xlabel("Epoch")
        bar = fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.9, pad=0.01)
        bar.set_label("Density (black: 0)")
        _percent_axis(bar.ax.yaxis, 100)
        fig.suptitle(f"{_title(dataset, model)}: density per layer and epoch (mean over seeds)")
        paths += _save(fig, out, f"layer_density_epochs_{dataset}_{model}")
    return paths


def _mask_title(mask) -> str:
    shape = "x".join(map(str, mask.shape))
    if mask.kind == "conv":
        detail = f"{mask.empty}/{mask.cells} kernels empty"
    else:
        detail = f"{mask.cells - mask.empty}/{mask.cells} non-zero"
    blocks = "" if mask.block == (1, 1) else f", {mask.block[0]}x{mask.block[1]} cells per pixel"
    return f"{mask.layer} ({mask.kind} {shape})\n{detail}, density {100 * mask.density:.2g}%{blocks}"


def plot_masks(mask_runs: list, out: Path) -> list[Path]:
    """One figure per `mlbreg.report.MaskRun`: a panel per prunable layer, out x in, each cell a
    weight (linear) or a kernel (conv), coloured by its fraction of non-zeros, white when empty."""
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator
    plt = _plt()
    paths = []
    # mid to dark blue: a kernel with one non-zero of nine must stand out from the white of empty ones
    cmap = ListedColormap(plt.get_cmap("Blues")(np.linspace(0.45, 1.0, 256))).with_extremes(bad="white")
    for item in mask_runs:
        if not item.masks:
            continue
        conf = item.config
        cols = min(4, len(item.masks))
        rows = math.ceil(len(item.masks) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 0.8, 3.1 * rows + 0.9), squeeze=False,
                                 layout="constrained")
        image = None
        for ax, mask in zip(axes.ravel(), item.masks):
            # a panel may have fewer pixels than the layer has rows: resampling after colouring blends
            # a lone non-zero into a lighter pixel instead of dropping it
            image = ax.imshow(np.ma.masked_equal(mask.image, 0), cmap=cmap, vmin=0, vmax=1, aspect="auto",
                              interpolation="antialiased", interpolation_stage="rgba")
            ax.grid(False)
            ax.set_title(_mask_title(mask), fontsize=8)
            unit = "channel" if mask.kind == "conv" else "feature"
            ax.set_xlabel(f"input {unit}", fontsize=8)
            ax.set_ylabel(f"output {unit}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            for spine in ax.spines.values():   # white cells at the border need a frame
                spine.set_edgecolor("0.5")
        for ax in axes.ravel()[len(item.masks):]:
            ax.set_visible(False)
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
        bar.set_label("non-zero fraction (white: all zero)")
        label = _series_label(conf["method"], conf["setting"], [])
        fig.suptitle(f"{_title(conf['dataset'], conf['model'])}: non-zero weights of {label}\n{item.run}",
                     fontsize=10)
        slug = Path(item.path).name
        paths += _save(fig, out, f"masks_{conf['dataset']}_{conf['model']}_{conf['method']}_{slug}")
    return paths


def make_plots(agg: pd.DataFrame, metrics: pd.DataFrame, out: Path, dpi: int = 150, layers: pd.DataFrame | None = None,
               layer_agg: pd.DataFrame | None = None, masks: Iterable = ()) -> list[Path]:
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
