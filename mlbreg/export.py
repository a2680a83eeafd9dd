"""`mlbreg export RUN_DIR`: the trained model as a compact sparse safetensors file, and
`load` / `resolve`, which rebuild a model from such a file or from a run directory.

The tensors are laid out by `mlbreg.sparse_format` (values + bitmask or int32 indices per
prunable weight, the rest dense); this module adds the run around them, as the file's
metadata: the run's resolved config, the mlbreg version, num_classes and in_shape, the last
metrics row, run_key, device and the SHA-256 of the model.pt it was made from. So the file
alone rebuilds the model (`load`): no run directory and no data set needed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from . import __version__
from .data import DATASETS, load_dataset
from .models import create_model
from .rundir import RunDir
from .safe_load import TensorFileError, load_tensors, state_dict_in
from .sparse_format import FORMAT_TAG, SparseFormatError, pack_state, prunable_names, unpack_state
from .status import Status

FORMATS = ("safetensors",)
EXPORT_NAME = "model.safetensors"


class ExportError(Exception):
    """Bad input to export / load / eval: the message says what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- runs
def finished_run(run_dir: str | os.PathLike, action: str = "export") -> Path:
    """The run directory, if it holds a finished run's model.pt; else an ExportError that
    names the run's status and what to do."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ExportError(f"{path} is not a directory (expected a run directory of `mlbreg train`)")
    status = RunDir(path).read_status()
    if status is None:
        raise ExportError(
            f"{path} is not a run directory: no readable status.json "
            "(pass the directory `mlbreg train` wrote, with config.yaml and model.pt)"
        )
    state = status.get("status")
    if state != Status.FINISHED:
        # epoch, step: the last checkpoint's position (status.json follows the checkpoints)
        epoch, step = status.get("epoch"), status.get("step")
        where = f" after epoch {epoch} (step {step})" if epoch else f" at step {step}" if step else ""
        advice = {
            Status.RUNNING: "it is still training (or was killed without a signal): wait for it, or rerun the "
            "same `mlbreg train` command to resume it",
            Status.INTERRUPTED: "rerun the same `mlbreg train` command to resume it to the end",
            Status.DIVERGED: "its training loss became non-finite; train it again with other settings (e.g. a smaller lr)",
            Status.FAILED: "fix the error and rerun the same `mlbreg train` command",
        }.get(state, "train it to the end first")
        message = f" ({status['message']})" if status.get("message") else ""
        raise ExportError(f"run {path} is {state}{where}{message}: only a finished run can be used for {action}; {advice}")
    for name in ("model.pt", "config.yaml"):
        if not (path / name).exists():
            raise ExportError(f"run {path} is finished but has no {name}; train it again (resume=false)")
    return path


def model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's model.pt, loaded tensors-only (`mlbreg.safe_load`): a file holding any other
    Python object, or no state_dict, is an ExportError, never unpickled."""
    file = run_dir / "model.pt"
    try:
        state = state_dict_in(load_tensors(file, "model file"))
    except TensorFileError as err:
        raise ExportError(f"{err}; train the run again (resume=false) to rewrite it") from err
    if state is None:
        raise ExportError(f"{file} holds no state_dict (a dict of tensors); train the run again (resume=false) to rewrite it")
    return state


def run_config(run_dir: Path):
    return OmegaConf.load(run_dir / "config.yaml")


def final_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The last row of the run's metrics.csv (numbers as floats), or None."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    out: dict[str, Any] = {}
    for key, value in rows[-1].items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def dataset_shapes(cfg, from_data: bool = False) -> tuple[int, tuple[int, ...]]:
    """(num_classes, in_shape) of the run's data set: from the config (synthetic), the table,
    or (unknown name, or `from_data`) by loading the data set as `mlbreg.build.build` does."""

    ds = cfg.dataset
    if not from_data:
        if ds.name == "synthetic":
            return int(ds.get("num_classes", 10)), tuple(int(s) for s in ds.get("shape", (3, 32, 32)))
        # the shapes a data set has whatever the config (so loading a run's model.pt needs no data);
        # one that does not fit the saved weights (a TinyImageNet subset) falls back to reading the data
        source = DATASETS.get(ds.name) if ds.name in DATASETS else None
        if source is not None and source.num_classes is not None:
            return source.num_classes, source.in_shape
    options = {
        k: v
        for k, v in OmegaConf.to_container(ds, resolve=True).items()
        if k not in ("name", "root", "download", "loader", "num_workers")
    }
    data = load_dataset(ds.name, root=ds.root, download=False, **options)
    return data.num_classes, tuple(data.in_shape)


def build_model(cfg, num_classes: int, in_shape) -> nn.Module:
    """The run's architecture, as `mlbreg.build.build` creates it (weights to be loaded)."""

    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    return create_model(cfg.model.name, num_classes, in_shape, **kwargs)


def _model_with(cfg, state: dict[str, torch.Tensor], shapes=None) -> tuple[nn.Module, tuple]:
    """A model of the run's architecture holding `state` exactly, and its (num_classes, in_shape)
    (`shapes` None: from the table, or from the data set when the table does not fit the weights)."""
    guessed = shapes is None
    shapes = shapes or dataset_shapes(cfg)
    # the throw-away initialization must not move the caller's random numbers
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg, *shapes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        if not guessed:
            raise
        from_data = dataset_shapes(cfg, from_data=True)
        if from_data == shapes:
            raise
        return _model_with(cfg, state, from_data)
    return model, shapes


# --------------------------------------------------------------------------- export / load
def export(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, format: str = "safetensors") -> dict[str, Any]:
    """Write the finished run's model as a sparse file; returns a summary (path, sizes, encodings)."""
    from safetensors.torch import save

    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; valid: {', '.join(FORMATS)}")
    run = finished_run(run_dir)
    out = Path(out) if out is not None else run / EXPORT_NAME
    cfg = run_config(run)
    state = model_state(run)
    model, shapes = _model_with(cfg, state)
    try:
        tensors, layout = pack_state(state, prunable_names(model))
    except SparseFormatError as err:
        raise ExportError(str(err)) from err
    status = json.loads((run / "status.json").read_text())
    metadata = {
        "format": FORMAT_TAG,
        "mlbreg": __version__,
        "config": (run / "config.yaml").read_text(),
        "num_classes": json.dumps(shapes[0]),
        "in_shape": json.dumps(list(shapes[1])),
        "sparse": json.dumps(layout),
        "final": json.dumps(final_metrics(run) or status.get("final") or {}),
        "run_key": str(status.get("run_key", "")),
        "device": str(status.get("device", "")),  # where the run trained (and evaluated)
        "model_pt_sha256": _sha256(run / "model.pt"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    # bytes written by Python, not save_file: its file ignores the umask (mode 0600)
    tmp.write_bytes(save(tensors, metadata=metadata))
    tmp.replace(out)
    encodings = [info["encoding"] for info in layout.values()]
    return dict(
        path=out,
        bytes=out.stat().st_size,
        model_pt_bytes=(run / "model.pt").stat().st_size,
        bitmask=encodings.count("bitmask"),
        indices=encodings.count("indices"),
        data_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
    )


def read_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, metadata) of an exported file."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ExportError(f"cannot read {path} as a safetensors file: {err}") from err
    if metadata.get("format") != FORMAT_TAG:
        raise ExportError(f"{path} is not an `mlbreg export` file (format {metadata.get('format')!r}, expected {FORMAT_TAG!r})")
    try:
        return unpack_state(tensors, json.loads(metadata["sparse"])), metadata
    except SparseFormatError as err:
        raise ExportError(f"{path}: {err}") from err


def _is_export(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    # safetensors: 8-byte little-endian header length, then the JSON header
    return len(head) == 9 and head[8:9] == b"{"


def resolve(path: str | os.PathLike) -> dict[str, Any]:
    """What `load` (and `eval`) would read for `path`: a dict with ``kind`` ("export" or
    "model.pt"), ``file``, ``run_dir`` (None for a lone file), ``cfg``, ``shapes`` (None: to be
    found), ``state`` (the exact state_dict), ``final`` (the run's last metrics row, or None),
    ``device`` (where the run trained, or None) and ``metadata`` (of an export, else empty)."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist (expected a run directory or an exported .safetensors file)")
    if path.is_file() and _is_export(path):
        state, meta = read_export(path)
        shapes = (json.loads(meta["num_classes"]), tuple(json.loads(meta["in_shape"])))
        return dict(
            kind="export",
            file=path,
            run_dir=None,
            cfg=OmegaConf.create(meta["config"]),
            shapes=shapes,
            state=state,
            final=json.loads(meta.get("final") or "null") or None,
            metadata=meta,
            device=meta.get("device") or None,
        )
    run = finished_run(path.parent if path.is_file() else path, action="loading")
    exported = run / EXPORT_NAME
    if path.is_dir() and exported.exists():
        info = resolve(exported)
        recorded = info["metadata"].get("model_pt_sha256")
        if recorded and recorded != _sha256(run / "model.pt"):
            # the run was trained again after the export (model.pt replaced, the export kept)
            raise ExportError(
                f"{exported} was exported from an earlier model.pt of this run; export it again: mlbreg export {run}"
            )
        return dict(info, run_dir=run, final=final_metrics(run) or info["final"])
    state = model_state(run)
    return dict(
        kind="model.pt",
        file=run / "model.pt",
        run_dir=run,
        cfg=run_config(run),
        shapes=None,
        state=state,
        final=final_metrics(run),
        metadata={},
        device=json.loads((run / "status.json").read_text()).get("device"),
    )


def model_from(info: dict[str, Any], device="cpu") -> nn.Module:
    model, info["shapes"] = _model_with(info["cfg"], info["state"], info["shapes"])
    return model.to(device).eval()


def load(path: str | os.PathLike, device="cpu") -> nn.Module:
    """The trained model of a run directory (its export when there is one, else its model.pt)
    or of an exported file, rebuilt from the run's config, in eval mode on `device`."""
    return model_from(resolve(path), device)


# --------------------------------------------------------------------------- CLI
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mlbreg export",
        description=__doc__.split("\n\n")[0],
        epilog=f"Default output: RUN_DIR/{EXPORT_NAME}. Load it with mlbreg.load(path); check it with mlbreg eval FILE.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory of `mlbreg train`")
    p.add_argument("--out", metavar="FILE", help=f"output file (default RUN_DIR/{EXPORT_NAME})")
    p.add_argument("--format", default="safetensors", help=f"file format (valid: {', '.join(FORMATS)}; default safetensors)")
    args = p.parse_args(argv)
    try:
        done = export(args.run_dir, args.out, args.format)
    except ExportError as err:
        print(f"mlbreg export: {err}", file=sys.stderr)
        return 2
    print(
        f"mlbreg export: wrote {done['path']}: {done['bytes']:,} bytes (model.pt {done['model_pt_bytes']:,}; "
        f"sparse weights: {done['bitmask']} with a bitmask, {done['indices']} with indices)"
    )
    return 0
