"""What the report's plots share: matplotlib (Agg) set up, PNG + PDF saved, titles, labels, colours."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ..labels import DATASET_LABELS, METHOD_COLORS, METHOD_LABELS, MODEL_LABELS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 10, "legend.fontsize": 8, "axes.titlesize": 11}
    )
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


def _legend(ax, **kw) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(**kw)


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
