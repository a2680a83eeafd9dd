"""The compact sparse file of `mlbreg export` (format `mlbreg-sparse/1`, safetensors).

Storage of one prunable weight (Conv2d / Linear, `mlbreg.models.prunable_modules`): its
non-zero values (float32, row-major order) and their positions, as a packed bitmask
(1 bit per weight) or as int32 flat indices, whichever is smaller (indices win below a
density of 1/32). Every other tensor of the state_dict (BN, biases, buffers) is stored
dense. `layer_nbytes` is that rule in numbers; `mlbreg report` uses it for the model sizes
of its tables, so the sizes it prints are the sizes of the files `export` writes (plus the
file's small header).

The file (format tag ``mlbreg-sparse/1`` in its metadata):

* tensors: a dense entry under its state_dict name; a prunable weight ``W`` as
  ``W:values`` (its dtype, the non-zeros in row-major order) plus ``W:bitmask`` (uint8,
  ``numpy.packbits`` of the flattened ``W != 0``, big-endian bit order, ceil(numel/8) bytes)
  or ``W:indices`` (int32 ascending flat positions);
* metadata (strings): ``format``, ``mlbreg`` (version), ``config`` (the run's resolved
  config.yaml text), ``num_classes`` and ``in_shape`` (JSON), ``sparse`` (JSON: per weight
  its shape, dtype and encoding), ``final`` (JSON: the run's last metrics.csv row), ``run_key``,
  ``device`` (where the run trained) and ``model_pt_sha256`` (the model.pt it was made from).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .metrics import layer_nbytes
from .models import prunable_modules

__all__ = [
    "FORMAT_TAG",
    "SparseFormatError",
    "encode_weight",
    "decode_weight",
    "prunable_names",
    "pack_state",
    "unpack_state",
    "layer_nbytes",
]

FORMAT_TAG = "mlbreg-sparse/1"


class SparseFormatError(Exception):
    """A weight or a file that does not fit the format (the message names it)."""


# --------------------------------------------------------------------------- one tensor
def encode_weight(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], str]:
    """({suffix: tensor}, encoding) of one prunable weight, by `layer_nbytes`' rule."""
    flat = w.detach().cpu().reshape(-1)  # reshape: row-major order whatever the strides
    mask = flat != 0
    values = flat[mask].contiguous()
    nnz, numel = values.numel(), flat.numel()
    # ties go to the bitmask: the same size, and it has no int32 limit
    if 4 * nnz < math.ceil(numel / 8):
        if numel > 2**31 - 1:
            raise SparseFormatError(f"a weight with {numel} entries does not fit int32 indices")
        return {"values": values, "indices": mask.nonzero().squeeze(1).to(torch.int32)}, "indices"
    bits = torch.from_numpy(np.packbits(mask.numpy()))
    return {"values": values, "bitmask": bits}, "bitmask"


def decode_weight(name: str, parts: dict[str, torch.Tensor], info: dict[str, Any]) -> torch.Tensor:
    """The dense weight back from its stored parts (exactly: same values, zeros elsewhere)."""
    shape, encoding = tuple(info["shape"]), info["encoding"]
    numel = math.prod(shape)
    values = parts["values"]
    flat = torch.zeros(numel, dtype=values.dtype)
    if encoding == "bitmask":
        bits = parts["bitmask"]
        if bits.numel() != math.ceil(numel / 8):
            raise SparseFormatError(f"{name}: bitmask of {bits.numel()} bytes for {numel} weights")
        mask = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool))
        if int(mask.sum()) != values.numel():
            raise SparseFormatError(f"{name}: {values.numel()} values for {int(mask.sum())} set bits")
        flat[mask] = values
    elif encoding == "indices":
        idx = parts["indices"].long()
        if idx.numel() != values.numel() or (idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < numel)):
            raise SparseFormatError(f"{name}: {idx.numel()} indices (range {numel}) for {values.numel()} values")
        flat[idx] = values
    else:
        raise SparseFormatError(f"{name}: unknown encoding {encoding!r} (this mlbreg reads bitmask, indices)")
    return flat.reshape(shape)


# --------------------------------------------------------------------------- state dict <-> file
def prunable_names(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, _ in prunable_modules(model)}


def pack_state(state: dict[str, torch.Tensor], prunable: set[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors to store, per-weight layout) of a state_dict."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for name, t in state.items():
        if ":" in name:
            raise SparseFormatError(f"state_dict key {name!r} contains ':', which the file format reserves")
        if name in prunable:
            parts, encoding = encode_weight(t)
            layout[name] = dict(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."), encoding=encoding)
            tensors.update({f"{name}:{suffix}": part for suffix, part in parts.items()})
        else:
            # a copy: safetensors refuses tensors that share storage (and wants them contiguous)
            tensors[name] = t.detach().cpu().contiguous().clone()
    return tensors, layout


def unpack_state(tensors: dict[str, torch.Tensor], layout: dict[str, dict]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, sep, suffix = key.partition(":")
        if sep:
            parts.setdefault(name, {})[suffix] = t
        else:
            state[name] = t
    if set(parts) != set(layout):
        raise SparseFormatError(f"the file's sparse tensors {sorted(parts)} do not match its layout {sorted(layout)}")
    for name, info in layout.items():
        state[name] = decode_weight(name, parts[name], info)
    return state
