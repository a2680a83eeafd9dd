"""`mlbreg export RUN_DIR`: the trained model as a compact sparse safetensors file.

Storage of one prunable weight (Conv2d / Linear, `mlbreg.models.prunable_modules`): its
non-zero values (float32, row-major order) and their positions, as a packed bitmask
(1 bit per weight) or as int32 flat indices, whichever is smaller (indices win below a
density of 1/32). Every other tensor of the state_dict (BN, biases, buffers) is stored
dense. `layer_nbytes` is that rule in numbers; `mlbreg report` uses it for the model sizes
of its tables, so the sizes it prints are the sizes of the files `export` writes (plus the
file's small header).
"""
from __future__ import annotations

import math


def layer_nbytes(numel: int, nonzeros: int, itemsize: int = 4) -> int:
    """Bytes of one prunable weight in the exported file: values + the smaller position code."""
    bitmask = math.ceil(numel / 8)
    indices = 4 * nonzeros
    return itemsize * nonzeros + min(bitmask, indices)
