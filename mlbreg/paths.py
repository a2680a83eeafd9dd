"""Where mlbreg's own files are: the Hydra config tree. A leaf module (imports nothing of mlbreg)."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """The Hydra config tree: the repository's conf/ (editable install) or the installed copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "train.yaml").exists():
            return str(candidate)
    raise FileNotFoundError(f"mlbreg's config tree (conf/train.yaml) was not found next to {here}")
