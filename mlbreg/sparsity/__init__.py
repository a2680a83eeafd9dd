"""Sparsity structure: layer densities and sparse initialization, RigL, pruning."""
from .masks import SCHEMES, apply_masks_, exact_counts, layer_densities, sparse_init_
from .prune import finetune_split, global_magnitude_masks, load_dense_weights
from .rigl import RigL, drop_and_grow, drop_fraction

__all__ = ["SCHEMES", "RigL", "apply_masks_", "drop_and_grow", "drop_fraction", "exact_counts", "finetune_split",
           "global_magnitude_masks", "layer_densities", "load_dense_weights", "sparse_init_"]
