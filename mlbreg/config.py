"""Config checks and run identity.

`validate` runs before any data is loaded or any file is written: every bad value fails
with a message that names the key, the value and what is allowed. The checks are tables
(`TOP_RULES` here, each method's `rules` in mlbreg.methods) applied by
`mlbreg.checks.check_table`, and a config is checked once per job however many callers
ask (the run-dir resolver, the sweep check, `train`).

`run_name` derives a run's directory name from the config keys that identify the run (not
from the clock), so re-running a command finds its earlier run (to skip or resume it) and
a different config never reuses a directory. Names are a persistent contract
(tests/test_golden.py).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .backends import BACKENDS, sparseprop_available
from .backends.native import unavailable_reason
from .checks import (
    ConfigError,
    above,
    at_least,
    boolean,
    check_table,
    choice,
    fail,
    integer,
    interval,
    number,
    optional,
)
from .data import DATASETS, LOADERS, DataNotFoundError, missing_data
from .loggers import LOGGERS, tensorboard_missing
from .methods import METHODS, method_class
from .models import check_model_name, is_external
from .optim.regularizers import REGULARIZERS
from .paths import config_dir
from .sparsity import SCHEMES

__all__ = [
    "ConfigError",
    "validate",
    "check_data",
    "check_device",
    "run_name",
    "identity",
    "digest",
    "known_keys",
    "unknown_key_message",
    "unused_notes",
    "GROUPS",
    "NON_IDENTIFYING",
    "LATER_KEYS",
]

GROUPS = ("dataset", "model", "method", "regularizer", "init")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULERS = ("cosine", "constant")
# Keys that change how a run is executed or where its data comes from, not its results:
# they are left out of the run's identity so that e.g. a resumed run may use another device.
NON_IDENTIFYING = (
    "resume",
    "wait_for_lock",
    "device",
    "progress",
    "logger",
    "checkpoint_every",
    "output_root",
    "num_threads",
    "distributed",
    "stop_check_every",
    "compile",
    "compile_optimizer",
    "hydra",
    "dataset.root",
    "dataset.download",
    "dataset.num_workers",
    "eval_batch_size",
)

# Identifying keys added after runs already existed, with the default they were added with.
# A run that leaves such a key at that default keeps the name it had before the key
# existed, so upgrading mlbreg mid-sweep still skips and resumes the sweep's runs. A new
# identifying key whose default keeps the old behaviour belongs here.
LATER_KEYS: dict[str, Any] = {
    "dataset.augment": False,
    "method.momentum_style": "torch",
    # RigL's reference defaults changed the behaviour: runs at the new defaults get
    # new names; a config asking for the old behaviour keeps the old name
    "method.reinit_when_same": True,
    "method.count": "round",
    "method.drop_noise_std": 0,
}


def _model_name(value, key):
    """A registered model, torchvision.<name> or timm.<name> (the error says how to list the valid ones)."""
    check_model_name(value)


def _sparsity(value, key):
    if value is not None and not 0 < number(value, key) < 1:
        fail(key, value, "must be in (0, 1) (the fraction of prunable weights that are zero)")


def _top_rules() -> tuple:
    """The checks of the keys every run has, in the order they are reported."""
    return (
        ("dataset.name", choice(DATASETS)),
        ("model.name", _model_name),
        ("method.name", choice(METHODS)),
        ("regularizer.name", choice(r for r in REGULARIZERS if r != "none")),
        ("init.scheme", choice(SCHEMES)),
        ("device", choice(DEVICES)),
        ("scheduler", choice(SCHEDULERS)),
        ("backend", choice(BACKENDS)),
        ("precision", choice(("fp32", "bf16"))),
        ("dataset.loader", choice(LOADERS.names())),
        ("logger", choice(LOGGERS)),
        ("compile_optimizer", choice(("auto", True, False))),
        ("channels_last", choice(("auto", True, False))),
        ("lam", at_least(0)),
        ("m", integer(1, " (m = 1 is LinBreg)")),
        ("lr", above(0)),
        ("momentum", interval(0, 1, "[)")),
        ("epochs", integer(1)),
        ("batch_size", integer(1)),
        ("init.density", interval(0, 1, "(]")),
        ("init.scale", above(0)),
        ("sparsity", _sparsity),
        ("checkpoint_every", integer(0, " (0 = only at the end and on signals)")),
        ("seed", integer(0)),
        ("eval_batch_size", integer(1)),
        ("stop_check_every", integer(1)),
        ("num_threads", optional(integer(1), " (or null for torch's default)")),
        *((key, boolean) for key in ("resume", "wait_for_lock", "compile", "progress", "distributed", "sync_batchnorm")),
    )


@cache
def known_keys(group: str | None = None, option: str | None = None) -> tuple[str, ...]:
    """The keys a config may have: top-level (group None) from conf/train.yaml plus the
    groups, or those of one group option (conf/<group>/<option>.yaml; all options of the
    group when that file does not exist)."""
    conf = Path(config_dir())
    if group is None:
        files, extra = [conf / "train.yaml"], {*GROUPS, "hydra"}
    else:
        files, extra = [conf / group / f"{option}.yaml"], set()
        if not files[0].exists():
            files = sorted((conf / group).glob("*.yaml"))
    keys = set(extra)
    for f in files:
        keys |= _file_keys(f)
    return tuple(sorted(keys))


def _file_keys(path: Path) -> set[str]:
    """The keys of a config file and of the options of its own group it extends (`defaults: [linbreg]`)."""
    data = OmegaConf.to_container(OmegaConf.load(path)) or {}
    keys = {k for k in data if k != "defaults"}
    for base in data.get("defaults", []):
        if isinstance(base, str) and base != "_self_" and (path.parent / f"{base}.yaml").exists():
            keys |= _file_keys(path.parent / f"{base}.yaml")
    return keys


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
        if group == "model" and is_external(node.get("name")):
            continue  # torchvision / timm models: extra keys go to their builder (models/external.py)
        valid = known_keys(group, node.get("name"))
        for key in node.keys():
            if key not in valid:
                raise ConfigError(unknown_key_message(f"{group}.{key}", valid))


def unused_notes(cfg: DictConfig) -> list[str]:
    """Notes on set keys that the chosen method does not use (allowed: see `Method.unused_notes`)."""
    return method_class(cfg.method.name).unused_notes(cfg)


_VALIDATED: set[tuple[str, bool]] = set()


def validate(cfg: DictConfig, environment: bool = True) -> None:
    """Raise ConfigError for the first invalid value. `environment=False` skips what
    depends on the machine (CUDA present, SparseProp installed): a sweep submitted to a
    cluster is checked on the login node, which may have neither. A config already
    checked (same content, same `environment`) is not checked again."""
    memo = (digest(_content(cfg), 16), environment)
    if memo in _VALIDATED:
        return
    _check_keys(cfg)
    check_table(cfg, _top_rules())
    method_class(cfg.method.name).check(cfg)
    if cfg.backend in ("sparseprop", "native"):
        _check_sparse_backend(cfg, environment)
    if cfg.logger == "tensorboard" and environment and tensorboard_missing():
        fail("logger", "tensorboard", tensorboard_missing())
    if cfg.device == "cuda" and environment:
        check_device("cuda")
    _VALIDATED.add(memo)


def check_device(device: str, key: str = "device", way_out: str = "use device=cpu or device=auto") -> None:
    """`device` is one of DEVICES (or cuda:N) and there on this machine: `mlbreg train`'s
    `device=` and `mlbreg eval`'s `--device` (a ConfigError naming `key` and `way_out`)."""
    kind, _, index = str(device).partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        fail(key, device, f"valid: {', '.join(DEVICES)} (or cuda:N)")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail(key, device, f"CUDA is not available on this machine; {way_out}")
        if index and int(index) >= torch.cuda.device_count():
            fail(key, device, f"this machine has {torch.cuda.device_count()} CUDA device(s); {way_out}")


def _content(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data without `hydra` (whose run dir is computed from it)."""
    return {
        k: OmegaConf.to_container(cfg._get_node(k), resolve=False)
        if OmegaConf.is_config(cfg._get_node(k))
        else cfg._get_node(k)._value()
        for k in cfg.keys()
        if k != "hydra"
    }


def check_data(cfg: DictConfig) -> None:
    """Raise DataNotFoundError, saying what to put where, if the data set's files are
    missing (and not to be downloaded): before a run directory is created."""
    missing = missing_data(
        cfg.dataset.name, OmegaConf.select(cfg, "dataset.root") or "data", bool(OmegaConf.select(cfg, "dataset.download"))
    )
    if missing:
        raise DataNotFoundError(missing)


def _check_sparse_backend(cfg: DictConfig, environment: bool) -> None:
    """backend=sparseprop / native: CPU sparse layers for ML LinBreg's coarse steps."""
    name = cfg.backend
    label = "SparseProp" if name == "sparseprop" else "the native kernels"
    if not method_class(cfg.method.name).has_coarse_steps:
        fail(
            "backend",
            name,
            f"sparse CPU layers serve ML LinBreg's coarse steps; method={cfg.method.name} needs backend=torch (or auto)",
        )
    if cfg.device == "cuda":
        fail("backend", name, f"{label} run on the CPU only; use device=cpu or backend=torch")
    if cfg.compile:
        fail("compile", True, "torch.compile works with torch layers only (backend=torch or auto)")
    if cfg.distributed:
        fail(
            "backend",
            name,
            "swapped layers get their gradients outside autograd, which DDP cannot "
            "synchronize; use backend=torch for distributed runs",
        )
    if not environment:
        return
    if name == "sparseprop":
        if not sparseprop_available():
            fail(
                "backend",
                name,
                "SparseProp is not installed: pip install pybind11 scipy && pip install "
                "--no-build-isolation 'sparseprop>=0.1.14' (see docs/backends.md), or use backend=torch",
            )
    else:
        reason = unavailable_reason()
        if reason:
            fail("backend", name, f"{reason}; or use backend=auto / torch")


def use_channels_last(cfg) -> bool:
    """channels_last=auto: on for bf16 (oneDNN's bf16 convolutions are fastest in NHWC), off for fp32."""
    value = cfg.get("channels_last", False)
    return cfg.get("precision") == "bf16" if value == "auto" else bool(value)


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the non-identifying keys, as plain data. channels_last=auto counts as
    false, the default it replaced: runs started before it keep their names and run directories."""
    # node by node, leaving out `hydra`: its run dir is computed from this very identity
    data = {}
    for key in cfg.keys():
        if key == "hydra":
            continue
        node = cfg._get_node(key)
        data[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else cfg[key]
    if data.get("channels_last") == "auto":
        data["channels_last"] = False
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
    """`<dataset>/<model>/<method>/<the method's name parts>_seed<N>_<hash of the identity>`."""
    method = cfg.method.name
    parts = [*method_class(method).name_parts(cfg), f"seed{cfg.seed}", digest(identity(cfg))]
    return f"{cfg.dataset.name}/{cfg.model.name}/{method}/{'_'.join(parts)}"
