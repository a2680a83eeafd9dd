"""What every training method is: the interface the loop drives, and the rules it owns.

The loop asks `step_kind()` before a step ("dense": a dense SGD step, "full_grad": a full
weight gradient with sparse forward, "sparse": everything on the support; this picks the
FLOPs model of docs/algorithms.md §6 and tells a sparse backend whether dense layers are
needed), calls `step()` after backward, and `end_epoch()` after each epoch.

Everything else mlbreg knows about a method is a class attribute or classmethod here, so
that adding a method is one class (see CONTRIBUTING.md, "Architecture"):

- `Settings`: a dataclass of the constructor's settings; an unknown setting raises.
- `rules`: its config checks, as a table for `mlbreg.checks.check_table`.
- `start`: the init policy (dense; at the target density 1 - `sparsity`; at `init.density`), and
  `needs_sparsity`: whether `sparsity` is the method's target.
- `unused_keys`: config keys it does not read (noted at launch, blanked by the report).
- `main_keys`: the hyperparameter its report rows are about.
- `has_coarse_steps`: the sparse CPU backends serve its coarse steps.
- `lam_sets_sparsity`: its sparsity follows λ (`mlbreg tune` searches λ for a target sparsity).
- `name_parts(cfg)`: its part of the run directory's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from omegaconf import OmegaConf
from torch import nn

from ..checks import ConfigError, Rule, check_table
from ..models import prunable_modules

INIT_KEYS = ("init.scheme", "init.density", "init.scale", "init.dense_first", "init.dense_last")


def prunable_weights(model: nn.Module) -> list[torch.Tensor]:
    return [mod.weight for _, mod in prunable_modules(model)]


def split_param_groups(model: nn.Module, reg: str, lam: float) -> list[dict]:
    """Prunable weights (Conv2d/Linear) get the regularizer; biases and norms are plain SGD."""
    prunable = prunable_weights(model)
    ids = {id(p) for p in prunable}
    others = [p for p in model.parameters() if id(p) not in ids]
    groups = [dict(params=prunable, reg=reg, lam=lam)]
    if others:
        groups.append(dict(params=others, reg="none", lam=0.0))
    return groups


def sgd(model: nn.Module, s) -> torch.optim.SGD:
    """The torch SGD the dense and fixed-density baselines step with (settings `s`)."""
    return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, dampening=s.dampening, weight_decay=s.weight_decay)


def mask_counts(masks: list[torch.Tensor]) -> torch.Tensor:
    """Non-zeros per mask as a float64 vector on the masks' device (once per structure change)."""
    return torch.stack([m.count_nonzero() for m in masks]).to(torch.float64)


def config_values(cfg, steps_per_epoch: int) -> dict[str, Any]:
    """Every value a method may take from a config: top-level keys, derived counts, and the
    method group's own keys (`cfg.method.*`, which are exactly its Settings fields)."""
    values = dict(
        lr=cfg.lr,
        momentum=cfg.momentum,
        lam=cfg.lam,
        m=cfg.m,
        reg=cfg.regularizer.name,
        sparsity=cfg.sparsity,
        epochs=cfg.epochs,
        steps_per_epoch=steps_per_epoch,
        seed=cfg.seed,
        total_steps=cfg.epochs * steps_per_epoch,
        compiled={"auto": None, True: True, False: False}[cfg.compile_optimizer],
        init_scheme=cfg.init.scheme,
        dense_first=cfg.init.dense_first,
        dense_last=cfg.init.dense_last,
    )
    values.update({k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k != "name"})
    return values


class Method:
    name: ClassVar[str] = "base"
    Settings: ClassVar[type]
    rules: ClassVar[tuple[tuple[str, Rule], ...]] = ()
    # where training starts (docs/algorithms.md §4): "dense" (Kaiming, scale 1), "target" (a sparse init at
    # the target density 1 - sparsity: fixed-density methods) or "init_density" (a sparse init at init.density)
    start: ClassVar[str] = "init_density"
    needs_sparsity: ClassVar[bool] = False  # cfg.sparsity is this method's target (it must be set)
    has_coarse_steps: ClassVar[bool] = False  # sparse CPU backends (native, sparseprop) serve its steps
    lam_sets_sparsity: ClassVar[bool] = False  # its sparsity follows λ (what `mlbreg tune` searches)
    unused_keys: ClassVar[tuple[str, ...]] = ()
    main_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    # -- the rules ---------------------------------------------------------------------
    @classmethod
    def make_settings(cls, values: dict[str, Any]):
        """`Settings(**values)`; an unknown key raises (no silently ignored setting)."""
        fields = {f.name for f in dataclasses.fields(cls.Settings)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(
                f"method {cls.name} has no setting {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(fields))}"
            )
        return cls.Settings(**values)

    @classmethod
    def settings_from(cls, cfg, steps_per_epoch: int):
        """The Settings of a run: the fields this method has, taken from the config."""
        values = config_values(cfg, steps_per_epoch)
        fields = {f.name for f in dataclasses.fields(cls.Settings)}
        return cls.make_settings({k: v for k, v in values.items() if k in fields})

    @classmethod
    def init_density(cls, cfg) -> float:
        """The overall density the run starts from."""
        return {"dense": 1.0, "target": 1.0 - (cfg.sparsity or 0.0), "init_density": cfg.init.density}[cls.start]

    @classmethod
    def check(cls, cfg) -> None:
        """Raise ConfigError for a bad value of a key this method reads."""
        if (cls.needs_sparsity or cls.start == "target") and cfg.sparsity is None:
            raise ConfigError(f"invalid sparsity=null: method={cls.name} needs a target sparsity in (0, 1), e.g. sparsity=0.9")
        check_table(cfg, cls.rules)

    @classmethod
    def name_parts(cls, cfg) -> list[str]:
        """This method's part of the run name (before `seed<N>_<hash>`)."""
        return []

    @classmethod
    def unused_notes(cls, cfg) -> list[str]:
        """Notes on set keys this method does not read (allowed, so that one sweep can
        cover several methods, e.g. `method=sgd,rigl sparsity=0.9`)."""
        if cfg.sparsity is not None and "sparsity" in cls.unused_keys:
            return [
                f"sparsity={cfg.sparsity} is not used by method={cls.name} (rigl, set, static, gmp and "
                "prune_finetune use a target sparsity; ML LinBreg's and LinBreg's follows from lam)"
            ]
        return []

    # -- the loop's interface ----------------------------------------------------------
    def step_kind(self) -> str:
        raise NotImplementedError

    def step(self) -> None:
        self.optimizer.step()

    def end_epoch(self, epoch: int) -> None:
        """Called after every epoch (prune_finetune prunes here)."""

    def structure_nnz(self, kind: str) -> torch.Tensor | None:
        """Per prunable layer, the number of weights a step of `kind` computes on, when the
        method fixes a structure (float64, on the weights' device); None: θ's non-zeros."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
