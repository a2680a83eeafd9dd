"""Optimizers: LinBreg and ML LinBreg, usable in any PyTorch loop like torch.optim.SGD."""

from .linbreg import LinBreg, MLLinBreg
from .regularizers import REGULARIZERS
from .update import linbreg_update

__all__ = ["LinBreg", "MLLinBreg", "linbreg_update", "REGULARIZERS"]
