"""Optional extra loggers of the per-epoch metrics (`logger=tensorboard`).

The CSV files of the run directory stay the record (the report reads only them); a logger
here is a view of the same rows for people who watch runs live in TensorBoard.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

LOGGERS = ("csv", "tensorboard")


def tensorboard_missing() -> str | None:
    """Why logger=tensorboard cannot run here, or None."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs the package)
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        return f"the tensorboard package is not installed ({err}); pip install 'mlbreg[tensorboard]'"
    return None


class TensorBoardLog:
    """The epoch rows as scalars `metrics/<column>` at the row's training step, in
    RUN_DIR/tensorboard. A resumed run purges the events written after its checkpoint, as
    the CSVs drop their rows, so the curves have neither duplicates nor gaps."""

    def __init__(self, log_dir: Path, resumed_at_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = resumed_at_step + 1 if resumed_at_step is not None else None
        self.writer = SummaryWriter(str(log_dir), purge_step=purge)

    def append(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"metrics/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_logger(name: str, run_dir: Path, resumed_at_step: int | None):
    """The extra logger for `logger=name` (None for csv: the CSVs are always written)."""
    if name == "tensorboard":
        return TensorBoardLog(run_dir / "tensorboard", resumed_at_step)
    return None
