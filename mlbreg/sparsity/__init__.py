"""Sparsity structure: layer densities and sparse initialization, RigL, pruning."""
from .masks import SCHEMES, exact_counts, layer_densities, sparse_init_

__all__ = ["SCHEMES", "exact_counts", "layer_densities", "sparse_init_"]
