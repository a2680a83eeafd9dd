"""Config checks and run identity.

`validate` runs before any data is loaded or any file is written: every bad value fails
with a message that names the key, the value and what is allowed. `run_name` derives a
run's directory name from the config keys that identify the run (not from the clock), so
re-running a command finds its earlier run (to skip or resume it) and a different config
never reuses a directory.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .backends import BACKENDS
from .data import DATASETS, DataNotFoundError, missing_data
from .loggers import LOGGERS, tensorboard_missing
from .methods import METHODS, method_class
from .models import list_models
from .optim import MLLinBreg
from .optim.regularizers import REGULARIZERS
from .sparsity import SCHEMES

GROUPS = ("dataset", "model", "method", "regularizer", "init")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULERS = ("cosine", "constant")
# Keys that change how a run is executed or where its data comes from, not its results:
# they are left out of the run's identity so that e.g. a resumed run may use another device.
NON_IDENTIFYING = ("resume", "device", "progress", "logger", "checkpoint_every", "output_root", "num_threads",
                   "distributed", "stop_check_every", "compile", "compile_optimizer",
                   "hydra", "dataset.root", "dataset.download", "dataset.num_workers", "eval_batch_size")

# Identifying keys added after runs already existed, with the default they were added with.
# A run that leaves such a key at that default keeps the name it had before the key
# existed, so upgrading mlbreg mid-sweep still skips and resumes the sweep's runs. A new
# identifying key whose default keeps the old behaviour belongs here.
LATER_KEYS: dict[str, Any] = {"dataset.augment": False}


class ConfigError(ValueError):
    """An invalid configuration value (raised before anything runs)."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"invalid {key}={value!r}: {allowed}")


@lru_cache(maxsize=None)
def known_keys(group: str | None = None, option: str | None = None) -> tuple[str, ...]:
    """The keys a config may have: top-level (group None) from conf/train.yaml plus the
    groups, or those of one group option (conf/<group>/<option>.yaml; all options of the
    group when that file does not exist)."""
    from .cli import config_dir  # cli.py imports nothing heavy
    conf = Path(config_dir())
    if group is None:
        files, extra = [conf / "train.yaml"], {*GROUPS, "hydra"}
    else:
        files, extra = [conf / group / f"{option}.yaml"], set()
        if not files[0].exists():
            files = sorted((conf / group).glob("*.yaml"))
    keys = set(extra)
    for f in files:
        keys |= {k for k in OmegaConf.to_container(OmegaConf.load(f)) or {} if k != "defaults"}
    return tuple(sorted(keys))


def unknown_key_message(key: str, valid: tuple[str, ...]) -> str:
    """'unknown key X; did you mean Y?' with the valid keys (for typos like lamda=0.1)."""
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {key[: len(key) - len(name)]}{close[0]}?)" if close else ""
    return f"unknown key {key!r}{hint}; valid: {', '.join(k for k in valid if k != 'hydra')}"


def _check_keys(cfg: DictConfig) -> None:
    # Hydra refuses `lamda=0.1` but accepts `+lamda=0.1`, which would train with the
    # default λ and put the stray key into the run's name: refuse unknown keys here
    valid = known_keys()
    for key in cfg.keys():
        if key not in valid:
            raise ConfigError(unknown_key_message(str(key), valid))
    for group in GROUPS:
        node = OmegaConf.select(cfg, group)
        if not OmegaConf.is_dict(node):
            continue
        valid = known_keys(group, node.get("name"))
        for key in node.keys():
            if key not in valid:
                raise ConfigError(unknown_key_message(f"{group}.{key}", valid))


def _number(cfg, key: str):
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, value, "must be a number")
    if not math.isfinite(value):
        _fail(key, value, "must be a finite number")
    return value


def _integer(cfg, key: str, low: int, meaning: str = "") -> int:
    value = _number(cfg, key)
    if int(value) != value or value < low:
        _fail(key, value, f"must be an integer >= {low}{meaning}")
    return int(value)


def ignored_settings(cfg: DictConfig) -> list[str]:
    """Notes on set keys that the chosen method does not use (allowed, so that one sweep
    can cover several methods, e.g. `method=sgd,rigl sparsity=0.9`)."""
    notes = []
    if cfg.sparsity is not None and not method_class(cfg.method.name).needs_sparsity:
        notes.append(f"sparsity={cfg.sparsity} is ignored by method={cfg.method.name} (rigl and prune_finetune "
                     "use a target sparsity; ML LinBreg's and LinBreg's follows from lam)")
    return notes


def validate(cfg: DictConfig, environment: bool = True) -> None:
    """Raise ConfigError for the first invalid value. `environment=False` skips what
    depends on the machine (CUDA present, SparseProp installed): a sweep submitted to a
    cluster is checked on the login node, which may have neither."""
    _check_keys(cfg)
    choices = {"dataset.name": DATASETS, "model.name": tuple(list_models()), "method.name": METHODS,
               "regularizer.name": tuple(r for r in REGULARIZERS if r != "none"), "init.scheme": SCHEMES,
               "device": DEVICES, "scheduler": SCHEDULERS, "backend": BACKENDS,
               "precision": ("fp32", "bf16"), "dataset.loader": ("tensor", "torchvision"), "logger": LOGGERS}
    for key, valid in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in valid:
            _fail(key, value, f"valid: {', '.join(valid)}")
    if cfg.compile_optimizer not in ("auto", True, False):
        _fail("compile_optimizer", cfg.compile_optimizer, "valid: auto, true, false")
    if _number(cfg, "lam") < 0:
        _fail("lam", cfg.lam, "must be >= 0")
    _integer(cfg, "m", 1, " (m = 1 is LinBreg)")
    if _number(cfg, "lr") <= 0:
        _fail("lr", cfg.lr, "must be > 0")
    if not 0 <= _number(cfg, "momentum") < 1:
        _fail("momentum", cfg.momentum, "must be in [0, 1)")
    _integer(cfg, "epochs", 1)
    _integer(cfg, "batch_size", 1)
    if not 0 < _number(cfg, "init.density") <= 1:
        _fail("init.density", cfg.init.density, "must be in (0, 1]")
    if _number(cfg, "init.scale") <= 0:
        _fail("init.scale", cfg.init.scale, "must be > 0")
    if "delta" in cfg.method and _number(cfg, "method.delta") <= 0:
        _fail("method.delta", cfg.method.delta, "must be > 0")
    if "criterion" in cfg.method and cfg.method.criterion not in MLLinBreg.CRITERIA:
        _fail("method.criterion", cfg.method.criterion, f"valid: {', '.join(MLLinBreg.CRITERIA)}")
    # fixed-density baselines (rigl, prune_finetune) and their target `sparsity`
    method = cfg.method.name
    sparsity = OmegaConf.select(cfg, "sparsity")
    if method_class(method).needs_sparsity and sparsity is None:
        raise ConfigError(f"invalid sparsity=null: method={method} needs a target sparsity in (0, 1), "
                          "e.g. sparsity=0.9")
    if sparsity is not None and not 0 < _number(cfg, "sparsity") < 1:
        _fail("sparsity", sparsity, "must be in (0, 1) (the fraction of prunable weights that are zero)")
    if "weight_decay" in cfg.method and _number(cfg, "method.weight_decay") < 0:
        _fail("method.weight_decay", cfg.method.weight_decay, "must be >= 0")
    if method == "rigl":
        _integer(cfg, "method.delta_t", 1, " (steps between mask updates)")
        if not 0 <= _number(cfg, "method.alpha") <= 1:
            _fail("method.alpha", cfg.method.alpha, "must be in [0, 1] (the initial drop fraction)")
        if not 0 < _number(cfg, "method.end_fraction") <= 1:
            _fail("method.end_fraction", cfg.method.end_fraction, "must be in (0, 1] (T_end as a fraction of all steps)")
    if method == "prune_finetune":
        from .sparsity.prune import checkpoint_file, finetune_split
        source = OmegaConf.select(cfg, "method.from_checkpoint")
        if source:
            try:
                checkpoint_file(source)
            except FileNotFoundError:
                _fail("method.from_checkpoint", source, "no such model.pt or run directory with a model.pt")
        try:
            finetune_split(cfg.epochs, OmegaConf.select(cfg, "method.finetune_epochs"), source)
        except ValueError as err:
            raise ConfigError(str(err).replace("invalid finetune_epochs", "invalid method.finetune_epochs")) from None
    _integer(cfg, "checkpoint_every", 0, " (0 = only at the end and on signals)")
    _integer(cfg, "seed", 0)
    _integer(cfg, "eval_batch_size", 1)
    _integer(cfg, "stop_check_every", 1)
    if cfg.num_threads is not None:
        _integer(cfg, "num_threads", 1, " (or null for torch's default)")
    for key in ("resume", "compile", "progress", "channels_last", "distributed", "sync_batchnorm"):
        if not isinstance(cfg[key], bool):
            _fail(key, cfg[key], "must be true or false")
    if "dampening" in cfg.method and not 0 <= _number(cfg, "method.dampening") <= 1:
        _fail("method.dampening", cfg.method.dampening, "must be in [0, 1]")
    if "kappa" in cfg.method and not 0 <= _number(cfg, "method.kappa") <= 1:
        _fail("method.kappa", cfg.method.kappa, "must be in [0, 1] (‖Rg‖ >= κ‖g‖ starts a coarse cycle)")
    if "eps" in cfg.method and _number(cfg, "method.eps") < 0:
        _fail("method.eps", cfg.method.eps, "must be >= 0")
    if cfg.backend in ("sparseprop", "native"):
        _check_sparse_backend(cfg, environment)
    if cfg.logger == "tensorboard" and environment and tensorboard_missing():
        _fail("logger", "tensorboard", tensorboard_missing())
    if cfg.device == "cuda" and environment:
        import torch
        if not torch.cuda.is_available():
            _fail("device", "cuda", "CUDA is not available on this machine; use device=cpu or device=auto")


def check_data(cfg: DictConfig) -> None:
    """Raise DataNotFoundError, saying what to put where, if the data set's files are
    missing (and not to be downloaded): before a run directory is created."""
    missing = missing_data(cfg.dataset.name, OmegaConf.select(cfg, "dataset.root") or "data",
                           bool(OmegaConf.select(cfg, "dataset.download")))
    if missing:
        raise DataNotFoundError(missing)


def _check_sparse_backend(cfg: DictConfig, environment: bool) -> None:
    """backend=sparseprop / native: CPU sparse layers for ML LinBreg's coarse steps."""
    name = cfg.backend
    label = "SparseProp" if name == "sparseprop" else "the native kernels"
    if cfg.method.name != "mllinbreg":
        _fail("backend", name, f"sparse CPU layers serve ML LinBreg's coarse steps; method={cfg.method.name} "
              "needs backend=torch (or auto)")
    if cfg.device == "cuda":
        _fail("backend", name, f"{label} run on the CPU only; use device=cpu or backend=torch")
    if cfg.compile:
        _fail("compile", True, "torch.compile works with torch layers only (backend=torch or auto)")
    if cfg.distributed:
        _fail("backend", name, "swapped layers get their gradients outside autograd, which DDP cannot "
              "synchronize; use backend=torch for distributed runs")
    if not environment:
        return
    if name == "sparseprop":
        from .backends import sparseprop_available
        if not sparseprop_available():
            _fail("backend", name, "SparseProp is not installed: pip install pybind11 scipy && pip install "
                  "--no-build-isolation 'sparseprop>=0.1.14' (see README), or use backend=torch")
    else:
        from .backends.native import unavailable_reason
        reason = unavailable_reason()
        if reason:
            _fail("backend", name, f"{reason}; or use backend=auto / torch")


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the non-identifying keys, as plain data."""
    # node by node, leaving out `hydra`: its run dir is computed from this very identity
    data = {}
    for key in cfg.keys():
        if key == "hydra":
            continue
        node = cfg._get_node(key)
        data[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else cfg[key]
    for key in (*NON_IDENTIFYING, *LATER_KEYS):
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if not isinstance(node, dict) or parts[-1] not in node:
            continue
        if key in NON_IDENTIFYING or node[parts[-1]] == LATER_KEYS[key]:
            del node[parts[-1]]
    return data


def digest(data: Any, length: int = 8) -> str:
    """A short, stable hash of plain data (the run name's suffix, the report's config ids)."""
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:length]


def run_name(cfg: DictConfig) -> str:
    """`<dataset>/<model>/<method>/<lam,m,init,seed>-<hash of the identity>`."""
    method = cfg.method.name
    parts = []
    if method in ("mllinbreg", "linbreg"):
        parts.append(f"{cfg.regularizer.name}-lam{cfg.lam:g}")
    if method == "mllinbreg":
        parts.append(f"m{cfg.m}")
    if method_class(method).needs_sparsity:   # fixed-sparsity methods: the target names the run
        parts.append(f"sp{cfg.sparsity:g}")
    if method in ("mllinbreg", "linbreg"):
        parts.append(f"{cfg.init.scheme}{cfg.init.density:g}")
    elif method == "rigl":
        parts.append(cfg.init.scheme)
    parts += [f"seed{cfg.seed}", digest(identity(cfg))]
    return f"{cfg.dataset.name}/{cfg.model.name}/{method}/{'_'.join(parts)}"
