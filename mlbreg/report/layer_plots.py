"""The report's per-layer plots: density per layer at the final epoch, density per layer and
epoch, and the mask pictures (see `mlbreg.report.plots` for the file names)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .aggregate import representatives as _representatives
from .plot_style import _config_colors, _legend, _percent_axis, _plt, _save, _series_label, _title


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
            ax.bar(
                x - 0.4 + width * (k + 0.5),
                mean,
                width,
                yerr=yerr,
                capsize=2,
                color=color,
                alpha=0.9,
                label=f"{_series_label(conf['method'], conf['setting'], [])}, n={n}",
                error_kw=dict(lw=0.8),
            )
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
        fig, axes = plt.subplots(
            len(grids),
            1,
            figsize=(9, sum(heights) + 0.6),
            squeeze=False,
            gridspec_kw=dict(height_ratios=heights),
            layout="constrained",
            sharex=True,
        )
        for ax, (conf, grid, n) in zip(axes[:, 0], grids):
            epochs = grid.columns.to_numpy(dtype=float)
            values = np.ma.masked_less_equal(grid.to_numpy(dtype=float), 0)
            image = ax.imshow(
                values,
                aspect="auto",
                interpolation="nearest",
                cmap=cmap,
                norm=LogNorm(vmin=vmin, vmax=1),
                extent=(epochs.min() - 0.5, epochs.max() + 0.5, len(grid) - 0.5, -0.5),
            )
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
        fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 0.8, 3.1 * rows + 0.9), squeeze=False, layout="constrained")
        image = None
        for ax, mask in zip(axes.ravel(), item.masks):
            # a panel may have fewer pixels than the layer has rows: resampling after colouring blends
            # a lone non-zero into a lighter pixel instead of dropping it
            image = ax.imshow(
                np.ma.masked_equal(mask.image, 0),
                cmap=cmap,
                vmin=0,
                vmax=1,
                aspect="auto",
                interpolation="antialiased",
                interpolation_stage="rgba",
            )
            ax.grid(False)
            ax.set_title(_mask_title(mask), fontsize=8)
            unit = "channel" if mask.kind == "conv" else "feature"
            ax.set_xlabel(f"input {unit}", fontsize=8)
            ax.set_ylabel(f"output {unit}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            for spine in ax.spines.values():  # white cells at the border need a frame
                spine.set_edgecolor("0.5")
        for ax in axes.ravel()[len(item.masks) :]:
            ax.set_visible(False)
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
        bar.set_label("non-zero fraction (white: all zero)")
        label = _series_label(conf["method"], conf["setting"], [])
        fig.suptitle(f"{_title(conf['dataset'], conf['model'])}: non-zero weights of {label}\n{item.run}", fontsize=10)
        slug = Path(item.path).name
        paths += _save(fig, out, f"masks_{conf['dataset']}_{conf['model']}_{conf['method']}_{slug}")
    return paths
