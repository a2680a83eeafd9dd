"""Provenance: what code, libraries and machine produced a run (`env.json` in its run dir).

`collect_env()` reads everything once at the start of a run; the trainer writes it next
to config.yaml. `mlbreg report` compares the environments of the runs it aggregates and
lists the fields that differ (`COMPARED_FIELDS`), since a torch or CPU change can move
timings and, for some kernels, the last digits of results.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# the fields whose differences `mlbreg report` lists (hostname and packages are recorded, not compared:
# every job of a cluster sweep runs on another node, and the package list is long)
COMPARED_FIELDS = ("mlbreg", "git_commit", "git_dirty", "python", "torch", "cuda", "cpu", "threads", "device", "gpu")


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(path: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout holding mlbreg's code (None, None outside git:
    an installed wheel)."""
    here = Path(path or Path(__file__).resolve().parent)
    commit = _git(["rev-parse", "HEAD"], here)
    if commit is None:
        return dict(git_commit=None, git_dirty=None)
    # tracked files only: run outputs or a venv inside the checkout do not make it dirty
    status = _git(["status", "--porcelain", "--untracked-files=no"], here)
    return dict(git_commit=commit, git_dirty=bool(status) if status is not None else None)


def packages() -> dict[str, str]:
    """Every installed distribution and its version, sorted by name."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            found[name.lower()] = dist.version
    return dict(sorted(found.items()))


def collect_env(device: Any = None) -> dict[str, Any]:
    """The provenance record of a run on `device` (a torch.device or its type name)."""
    import torch

    from . import __version__

    device_type = getattr(device, "type", device) or "cpu"
    gpu = None
    if device_type == "cuda" and torch.cuda.is_available():
        index = getattr(device, "index", None) or 0
        gpu = torch.cuda.get_device_name(index)
    return dict(
        mlbreg=__version__,
        **git_state(),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        cpu=cpu_model(),
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        device=device_type,
        gpu=gpu,
        hostname=platform.node(),
        platform=platform.platform(),
        executable=sys.executable,
        packages=packages(),
    )


def differing(envs: dict[str, dict[str, Any]]) -> dict[str, dict[Any, list[str]]]:
    """{field: {value: [run names]}} for each compared field that is not the same in all of
    `envs` ({run name: env.json contents}); runs without env.json are not compared."""
    out: dict[str, dict[Any, list[str]]] = {}
    for field in COMPARED_FIELDS:
        values: dict[Any, list[str]] = {}
        for name, env in envs.items():
            values.setdefault(env.get(field), []).append(name)
        if len(values) > 1:
            out[field] = values
    return out
