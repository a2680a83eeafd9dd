"""Prune + fine-tune (docs/algorithms.md §5): dense SGD, one-shot global magnitude pruning, fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..checks import ConfigError, fail
from ..sparsity import apply_masks_, finetune_split, global_magnitude_masks, load_dense_weights
from ..sparsity.prune import checkpoint_file
from .base import INIT_KEYS, Method, mask_counts, prunable_weights, sgd
from .sgd import SGD_RULES


@dataclass(frozen=True)
class PruneFinetuneSettings:
    lr: float
    sparsity: float
    epochs: int
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dampening: float = 0.0
    finetune_epochs: float = 0.1
    from_checkpoint: str | None = None


class PruneFinetuneMethod(Method):
    """Dense SGD, one-shot global magnitude pruning to `sparsity`, then fine-tuning with
    the mask fixed.

    The dense phase takes the first `epochs − finetune_epochs` epochs (see
    `mlbreg.sparsity.prune.finetune_split`); the pruning happens in `end_epoch` at that
    boundary. With `from_checkpoint` (a model.pt or a run directory) the saved dense
    weights are loaded at construction and pruned at once, and every epoch fine-tunes.
    Fine-tuning steps, then re-masks weights and momentum.
    """

    name = "prune_finetune"
    Settings = PruneFinetuneSettings
    rules = SGD_RULES
    start = "dense"
    needs_sparsity = True
    unused_keys = ("lam", "m", "regularizer.name", *INIT_KEYS)
    main_keys = ("sparsity",)

    def __init__(self, model, settings: PruneFinetuneSettings):
        s = settings
        super().__init__(sgd(model, s))
        if s.sparsity is None or not 0 < s.sparsity < 1:
            raise ValueError(f"invalid sparsity={s.sparsity!r}: prune_finetune needs a target sparsity in (0, 1)")
        self.weights = prunable_weights(model)
        self.sparsity = float(s.sparsity)
        self.dense_epochs, _ = finetune_split(s.epochs, s.finetune_epochs, s.from_checkpoint)
        self.masks: list[torch.Tensor] | None = None
        self.pruned_at_epoch: int | None = None
        self._mask_nnz = None
        if s.from_checkpoint:
            load_dense_weights(model, s.from_checkpoint)
            self.prune(epoch=0)

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        source = cfg.method.get("from_checkpoint")
        if source:
            try:
                checkpoint_file(source)
            except FileNotFoundError:
                fail("method.from_checkpoint", source, "no such model.pt or run directory with a model.pt")
        try:
            finetune_split(cfg.epochs, cfg.method.get("finetune_epochs"), source)
        except ValueError as err:
            raise ConfigError(str(err).replace("invalid finetune_epochs", "invalid method.finetune_epochs")) from None

    @classmethod
    def name_parts(cls, cfg) -> list[str]:
        return [f"sp{cfg.sparsity:g}"]

    def structure_nnz(self, kind: str):
        """Fine-tuning steps compute on the fixed mask."""
        if kind != "sparse" or self.masks is None:
            return None
        if self._mask_nnz is None:
            self._mask_nnz = mask_counts(self.masks)
        return self._mask_nnz

    @property
    def pruned(self) -> bool:
        return self.masks is not None

    def step_kind(self) -> str:
        return "sparse" if self.pruned else "dense"

    def step(self) -> None:
        self.optimizer.step()
        if self.pruned:
            apply_masks_(self.weights, self.masks, self.optimizer)

    @torch.no_grad()
    def prune(self, epoch: int) -> None:
        self.masks = global_magnitude_masks(self.weights, self.sparsity)
        self._mask_nnz = None
        apply_masks_(self.weights, self.masks, self.optimizer)
        self.pruned_at_epoch = epoch

    def end_epoch(self, epoch: int) -> None:
        if not self.pruned and epoch >= self.dense_epochs:
            self.prune(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "pruned_at_epoch": self.pruned_at_epoch,
            "masks": None if self.masks is None else [m.clone() for m in self.masks],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        masks = state.get("masks")
        self.masks = None if masks is None else [m.to(device=w.device, dtype=torch.bool) for m, w in zip(masks, self.weights)]
        self._mask_nnz = None
        self.pruned_at_epoch = state.get("pruned_at_epoch")
