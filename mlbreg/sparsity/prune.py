"""One-shot global magnitude pruning (the prune + fine-tune baseline, docs/algorithms.md §5).

`global_magnitude_masks` keeps the largest-|θ| weights across all given tensors so that
exactly round(sparsity·N) of the N weights are pruned; ties in |θ| are broken by position
(layer order, then flat index: the earlier weight is pruned first), so the result is
deterministic. `finetune_split` decides how the epochs of a run are split.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checks import ConfigError
from ..safe_load import TensorFileError, load_tensors, state_dict_in

__all__ = ["global_magnitude_masks", "finetune_split", "load_dense_weights"]


@torch.no_grad()
def global_magnitude_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Boolean keep-masks with exactly round(sparsity·N) zeros over all `weights`, the
    smallest |θ| across layers pruned first (already-zero weights count as smallest)."""
    if not 0 <= sparsity <= 1:
        raise ValueError(f"invalid sparsity={sparsity}; must be in [0, 1]")
    if not weights:
        raise ValueError("no weights to prune")
    magnitudes = torch.cat([w.detach().reshape(-1).abs().to(torch.float32) for w in weights])
    n_prune = round(sparsity * magnitudes.numel())
    keep = torch.ones(magnitudes.numel(), dtype=torch.bool, device=magnitudes.device)
    if n_prune > 0:
        # a stable sort: equal magnitudes keep their order, so the earliest go first
        order = torch.sort(magnitudes, stable=True).indices
        keep[order[:n_prune]] = False
    return [m.view_as(w) for m, w in zip(keep.split([w.numel() for w in weights]), weights)]


def finetune_split(epochs: int, finetune_epochs: int | float, from_checkpoint: str | None = None) -> tuple[int, int]:
    """(dense epochs, fine-tuning epochs) of a prune_finetune run.

    `finetune_epochs` is a number of epochs (an integer >= 1, paper: 20 of 200) or a
    fraction of `epochs` in (0, 1) (e.g. 0.1; rounded, at least 1 epoch). At least one
    dense epoch must remain. With `from_checkpoint` the dense model exists already: it is
    pruned at once and all `epochs` fine-tune it."""
    if from_checkpoint:
        return 0, int(epochs)
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, (int, float)):
        raise ValueError(f"invalid finetune_epochs={finetune_epochs!r}: must be an integer >= 1 or a fraction in (0, 1)")
    if 0 < finetune_epochs < 1:
        ft = max(1, round(finetune_epochs * epochs))
    elif finetune_epochs >= 1 and int(finetune_epochs) == finetune_epochs:
        ft = int(finetune_epochs)
    else:
        raise ValueError(f"invalid finetune_epochs={finetune_epochs!r}: must be an integer >= 1 or a fraction in (0, 1)")
    if ft >= epochs:
        raise ValueError(
            f"invalid finetune_epochs={finetune_epochs!r}: gives {ft} fine-tuning epochs, which leaves no "
            f"dense epoch of epochs={epochs}; use fewer (e.g. a fraction like 0.1) or more epochs"
        )
    return int(epochs) - ft, ft


def checkpoint_file(path: str | Path) -> Path:
    """A dense model to prune: a state_dict file (model.pt) or a run directory (its model.pt)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"from_checkpoint: {path} does not exist (give a model.pt or a finished run directory)")
    return path


@torch.no_grad()
def load_dense_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """Load a saved model into `model` in place: a state_dict file (model.pt), a dict holding
    one under "model" (a run's checkpoint.pt) or "state_dict" (as many model zoos save them), or
    a run directory. The file is loaded tensors-only: one holding any other Python object is
    refused (ConfigError), never unpickled. Returns the file used."""
    file = checkpoint_file(path)
    try:
        saved = load_tensors(file, "method.from_checkpoint file")
    except TensorFileError as err:
        raise ConfigError(
            f"{err}; give a state_dict file (a run's model.pt or directory, or a file of torch.save(model.state_dict(), FILE))"
        ) from err
    state = state_dict_in(saved, ("model", "state_dict"))
    if state is None:
        raise ConfigError(
            f"method.from_checkpoint: {file} holds no state_dict (a dict of tensors, or one under "
            f"'model' or 'state_dict'); give a run's model.pt or directory, or a file of "
            f"torch.save(model.state_dict(), FILE)"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise ConfigError(
            f"method.from_checkpoint: {file} does not fit this model (same model= and dataset= as the "
            f"dense run are needed): {detail}"
        ) from err
    return file
