"""Reading `torch.save` files without running code from them.

Every checkpoint, model file and cache mlbreg reads goes through `load_tensors`:
`torch.load(..., weights_only=True)`, which rebuilds tensors and plain values (dicts,
lists, tuples, str, int, float, bool, None) and refuses any other Python object, whose
unpickling could call any function (a crafted `model.pt` whose `__reduce__` runs a shell
command). A refused or unreadable file is a `TensorFileError` with one line that names
the file; the caller adds what to do.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

__all__ = ["TensorFileError", "load_tensors", "state_dict_in"]

_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


class TensorFileError(ValueError):
    """A file that `load_tensors` will not (or cannot) load; `refused` names the Python object
    (module.name) it held, when that is why."""

    def __init__(self, message: str, path: Path, refused: str | None = None):
        super().__init__(message)
        self.path, self.refused = path, refused


def _reason(err: BaseException) -> tuple[str, str | None]:
    """(one line on why torch.load failed, the refused global or None)."""
    text = str(err)
    found = _GLOBAL.search(text)
    if found:
        return f"it holds a Python object ({found.group(1)}), not only tensors and plain values", found.group(1)
    if text.startswith("Weights only load failed"):
        # torch's advice is to load with weights_only=False: the one thing never to do here
        detail = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[-1].splitlines() if line.strip()]
        return f"not a file of tensors and plain values ({detail[0] if detail else 'refused'})", None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__, None


def load_tensors(path: str | Path, what: str = "file") -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU; a file it refuses or cannot read is a
    `TensorFileError` ("cannot read {what} {path}: ..."; one line)."""
    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem to the user
        reason, refused = _reason(err)
        message = f"cannot read {what} {path}: {reason}"
        if refused:
            message += "; mlbreg loads files tensors-only and runs no code from them"
        raise TensorFileError(message, path, refused) from err


def _is_state_dict(obj: Any) -> bool:
    import torch

    return (
        isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def state_dict_in(obj: Any, keys: tuple[str, ...] = ()) -> dict | None:
    """`obj` if it is a state_dict (a non-empty dict of str -> tensor), else the first of
    `obj[key]` for `key` in `keys` that is one; None if there is none."""
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in keys:
            if _is_state_dict(obj.get(key)):
                return obj[key]
    return None
