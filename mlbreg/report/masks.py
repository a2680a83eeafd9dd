"""Mask pictures: which weights (linear) or kernels (conv) of a run's model.pt are non-zero,
for one run of a few configurations per (dataset, model)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..labels import METHOD_LABELS
from .aggregate import representatives
from .collect import Collection


@dataclass
class LayerMask:
    """Which weights of one prunable layer are non-zero, as drawn.

    `image[i, j]` is the fraction of non-zero weights in cell (i, j): a cell is one weight of
    a linear layer (out x in) or one kernel of a conv layer (out_channels x in_channels),
    and a block of `block` cells where the layer is larger than the picture. 0 exactly
    where every weight of the cell is zero (an empty kernel)."""

    layer: str
    kind: str  # "conv" | "linear"
    shape: tuple[int, ...]
    image: np.ndarray
    block: tuple[int, int]  # cells per pixel (rows, columns); (1, 1): not downsampled
    density: float  # non-zero weights / all weights
    empty: int  # empty kernels (conv) or zero weights (linear)
    cells: int  # kernels (conv) or weights (linear)


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
    return LayerMask(
        layer=name,
        kind=kind,
        shape=tuple(w.shape),
        image=_block_mean(cells, block),
        block=block,
        density=float(nonzero.double().mean()),
        empty=empty,
        cells=cells.size,
    )


def mask_images(model_file: Path, max_side: int = 256) -> list[LayerMask]:
    """Every prunable weight of a run's model.pt, in the model's order.

    model.pt is the trainer's dense state_dict; the prunable layers (Conv2d, Linear) are
    exactly its 4-d and 2-d `.weight` tensors (BN weights are 1-d). Loaded tensors-only: a file
    holding any other Python object is a TensorFileError, never unpickled."""
    from ..safe_load import load_tensors, state_dict_in

    state = state_dict_in(load_tensors(model_file, "model file"))
    if state is None:
        raise ValueError(f"{model_file} holds no state_dict (a dict of tensors)")
    return [
        mask_image(key[: -len(".weight")], t, max_side)
        for key, t in state.items()
        if key.endswith(".weight") and getattr(t, "dim", lambda: 0)() in (2, 4)
    ]


@dataclass
class MaskRun:
    """One configuration's mask picture: the configuration, the run drawn, its layers."""

    config: dict[str, Any]  # its row of the aggregated frame
    run: str
    path: str
    masks: list[LayerMask]


def mask_runs(
    collection: Collection, agg: pd.DataFrame, limit: int = 4, max_side: int = 256
) -> tuple[list[MaskRun], list[str]]:
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
                notes.append(f"no mask picture for {label} ({conf['dataset']}/{conf['model']}): none of its runs has model.pt")
    return chosen, notes
