"""The parts of one run, built from its config: data, model, method, loaders, LR scheduler;
and the evaluation every epoch (and `mlbreg eval`) runs.

Deterministic in cfg.seed: the same config builds the same initial weights and batches.
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .data import load_dataset, make_loader
from .methods import method_class, method_from_config
from .models import create_model
from .sparsity import sparse_init_

__all__ = ["build", "evaluate", "init_density", "resolve_device", "seed_everything"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_density(cfg: DictConfig) -> float:
    return method_class(cfg.method.name).init_density(cfg)


class Parts(NamedTuple):
    """What a config builds: everything a run trains and evaluates."""

    data: Any  # mlbreg.data.Dataset
    model: nn.Module
    method: Any  # a mlbreg.methods.Method
    train_loader: Any
    test_loader: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler


def build(cfg: DictConfig, device: torch.device) -> Parts:
    """config -> the run's `Parts`. Deterministic in cfg.seed."""
    seed_everything(cfg.seed)
    options = {
        k: v
        for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()
        if k not in ("name", "root", "download", "loader", "num_workers")
    }
    data = load_dataset(cfg.dataset.name, root=cfg.dataset.root, download=cfg.dataset.download, **options)
    model_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    model = create_model(cfg.model.name, data.num_classes, data.in_shape, **model_kwargs)
    # dense methods start from dense Kaiming weights (scale 1), fixed-density methods (RigL)
    # at their target density, the others at init.density
    sparse = method_class(cfg.method.name).start != "dense"
    sparse_init_(
        model,
        density=init_density(cfg),
        scheme=cfg.init.scheme,
        scale=cfg.init.scale if sparse else 1.0,
        dense_first=cfg.init.dense_first,
        dense_last=cfg.init.dense_last,
        by_group=cfg.regularizer.name == "group",
        seed=cfg.seed,
    )
    model.to(device)
    loader = dict(kind=cfg.dataset.loader, device=device, seed=cfg.seed, num_workers=cfg.dataset.num_workers)
    train_loader = make_loader(
        split=data.train, batch_size=cfg.batch_size, mean=data.mean, std=data.std, shuffle=True, augment=data.augment, **loader
    )
    test_loader = make_loader(
        split=data.test, batch_size=cfg.eval_batch_size, mean=data.mean, std=data.std, shuffle=False, augment=False, **loader
    )
    method = method_from_config(cfg, model, len(train_loader))
    total_steps = cfg.epochs * len(train_loader)
    if cfg.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(method.optimizer, T_max=total_steps)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(method.optimizer, lambda step: 1.0)
    return Parts(data, model, method, train_loader, test_loader, scheduler)


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    correct = torch.zeros((), device=loss_sum.device, dtype=torch.long)
    count = 0
    for x, y in loader:
        out = model(x)
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        count += y.numel()
    model.train(was_training)
    return loss_sum.item() / count, 100.0 * correct.item() / count
