"""Sparsity structure: layer densities and sparse initialization, RigL / SET, pruning, GMP."""

from .gmp import GMP, SCOPES, gmp_sparsity, layer_magnitude_masks
from .masks import SCHEMES, apply_masks_, exact_counts, layer_densities, sparse_init_
from .prune import finetune_split, global_magnitude_masks, load_dense_weights
from .rigl import RigL, drop_and_grow, drop_and_grow_random, drop_fraction

__all__ = [
    "GMP",
    "SCHEMES",
    "SCOPES",
    "RigL",
    "apply_masks_",
    "drop_and_grow",
    "drop_and_grow_random",
    "drop_fraction",
    "exact_counts",
    "finetune_split",
    "gmp_sparsity",
    "global_magnitude_masks",
    "layer_densities",
    "layer_magnitude_masks",
    "load_dense_weights",
    "sparse_init_",
]
