"""Everything that touches Hydra: the run-dir resolver, the command line around a job, the
sweep check, flag splitting, error mapping and sweep expansion. A Hydra upgrade touches
this file only.

- `register_resolvers()`: `${mlbreg_run_name:}` in conf/train.yaml (validates on the way).
- `run_hydra(argv, job)`: `mlbreg train` / `mlbreg tune`'s command line, any launcher.
- `sweep_jobs(overrides)` / `expand_sweep(overrides)`: the jobs of `mlbreg train -m ...`
  without running them (`mlbreg report --sweep`).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from omegaconf import OmegaConf, open_dict

from .config import GROUPS, ConfigError, check_data, known_keys, run_name, unknown_key_message, validate
from .data import DataNotFoundError
from .models import HOW_TO_LIST, is_external
from .paths import config_dir
from .rundir import CheckpointError, RunFileError
from .status import Status
from .train import finished_status


class SweepError(ValueError):
    """A sweep's overrides do not compose (the message names the sweep or job)."""


def register_resolvers() -> None:
    def _run_name(*, _root_):
        # Hydra resolves the run dir before it creates it: checking the config (and that
        # the data is there) here makes bad input fail before anything is written.
        validate(_root_)
        check_data(_root_)
        return run_name(_root_)

    def _hydra_notes(*, _root_):
        # hydra.output_subdir: Hydra writes its notes (.hydra/) into a job's directory before
        # the job starts; a finished run that the job will skip gets none, so that it is kept
        # as it is (and a finished run on a read-only disk is skipped, not an error)
        run_dir = _root_.hydra.runtime.output_dir
        finished = os.path.exists(os.path.join(run_dir, "status.json")) and finished_status(_root_, run_dir)
        return None if finished else ".hydra"

    if not OmegaConf.has_resolver("mlbreg_run_name"):
        OmegaConf.register_new_resolver("mlbreg_run_name", _run_name)
    if not OmegaConf.has_resolver("mlbreg_hydra_notes"):
        OmegaConf.register_new_resolver("mlbreg_hydra_notes", _hydra_notes)
    _register_model_source()


_MODEL_SOURCE: list = []


def _register_model_source() -> None:
    """``model=torchvision.<name>`` / ``model=timm.<name>``: a Hydra config source (scheme ``mlbreg-models``, in
    conf/train.yaml's ``hydra.searchpath``) that answers ``model/<that name>`` with ``{name: <that name>}``, so
    such models need no file in conf/model/ and sweep like the others (``model=resnet18,torchvision.resnet18``).
    Whether the name exists is checked by `validate` (mlbreg.models.check_model_name)."""
    if _MODEL_SOURCE:
        return
    from hydra.core.plugins import Plugins
    from hydra.plugins.config_source import ConfigResult, ConfigSource

    def model_name(config_path: str) -> str | None:
        group, _, option = config_path.removesuffix(".yaml").partition("/")
        return option if group == "model" and is_external(option) else None

    class ExternalModelSource(ConfigSource):
        @staticmethod
        def scheme() -> str:
            return "mlbreg-models"

        def load_config(self, config_path: str) -> ConfigResult:
            return ConfigResult(
                provider=self.provider,
                path=self.full_path(),
                header={"package": None},
                config=OmegaConf.create({"name": model_name(config_path)}),
            )

        def is_group(self, config_path: str) -> bool:
            return False

        def is_config(self, config_path: str) -> bool:
            return model_name(config_path) is not None

        def available(self) -> bool:
            return True

        def list(self, config_path: str, results_filter) -> list[str]:
            return []

    Plugins.instance().register(ExternalModelSource)
    _MODEL_SOURCE.append(ExternalModelSource)


def run_hydra(argv: list[str], job, extra_overrides: tuple[str, ...] = ()) -> int:
    """Hydra's command line (one run, or a sweep with -m, on any launcher) around
    `job(cfg, run_dir) -> dict with "status"`; the exit code is 0 when every job's status
    is "finished". `extra_overrides` go after the user's (e.g. another run dir)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    statuses: list[str] = []

    @hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
    def hydra_main(cfg):
        result = job(cfg, HydraConfig.get().runtime.output_dir)
        statuses.append(result["status"])
        return result

    flags, overrides = split_flags(argv)
    if argv != flags + overrides:
        # argparse would call the overrides after a flag "unrecognized arguments"
        print(f"mlbreg: Hydra flags go before the overrides: mlbreg train {' '.join(flags + overrides)}", file=sys.stderr)
        return 2
    _check_whole_sweeps()
    sys.argv = [sys.argv[0]] + argv + list(extra_overrides)
    # let Hydra re-raise instead of printing and exiting, so known user errors become one line
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        hydra_main()
    except Exception as err:  # noqa: BLE001 - turn known user errors into one clear line
        known = user_error(err)
        if known is None:
            raise
        print(f"mlbreg: {known}", file=sys.stderr)
        return 2
    # a run that did not finish (diverged) makes the exit code non-zero, in a sweep too
    # a run skipped because another launcher runs it is not a failure of this command
    return 0 if all(s in (Status.FINISHED, "busy") for s in statuses) else 2


def _check_whole_sweeps() -> None:
    """Hydra composes every job of a sweep batch before it launches any
    (`Sweeper.validate_batch_is_legal`; without max_batch_size the batch is the whole sweep).
    Extend that check with mlbreg's config and data checks, so that a bad value in the
    seventh job stops the sweep before the first one starts, naming every bad job."""
    from hydra.plugins.sweeper import Sweeper

    if getattr(Sweeper.validate_batch_is_legal, "_mlbreg", False):
        return
    composes = Sweeper.validate_batch_is_legal

    def validate_batch_is_legal(self, batch):
        composes(self, batch)
        loader = self.hydra_context.config_loader if getattr(self, "hydra_context", None) else self.config_loader
        # a cluster launcher checks on the submitting machine: CUDA and the data may be
        # on the compute nodes only, where each job checks them again when it starts
        local = "slurm" not in str(OmegaConf.select(self.config, "hydra.launcher._target_")).lower()
        bad: dict[str, list[str]] = {}  # message -> the jobs (overrides) it applies to
        for overrides in batch:
            cfg = loader.load_sweep_config(master_config=self.config, sweep_overrides=list(overrides))
            try:
                validate(cfg, environment=local)
                if local:
                    check_data(cfg)
            except (ConfigError, DataNotFoundError) as err:
                bad.setdefault(str(err), []).append(" ".join(overrides))
        if bad:
            lines = [
                f"{msg}  [{jobs[0]}]" if len(jobs) == 1 else f"{msg}  ({len(jobs)} jobs, e.g. [{jobs[0]}])"
                for msg, jobs in bad.items()
            ]
            raise ConfigError(
                f"{sum(map(len, bad.values()))} of {len(batch)} jobs of the sweep are invalid, "
                "so none was started:" + "".join(f"\n  {line}" for line in lines)
            )

    validate_batch_is_legal._mlbreg = True
    Sweeper.validate_batch_is_legal = validate_batch_is_legal


# Hydra's flags that take a value (`--cfg job`, `-cn NAME`, `--info plugins`, ...)
_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--info",
    "-i",
}


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides), each in the given order."""
    flags, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            takes = (
                arg in _FLAGS_WITH_VALUE and i + 1 < len(argv) and "=" not in argv[i + 1] and not argv[i + 1].startswith("-")
            )
            flags += argv[i : i + 2] if takes else [arg]
            i += 2 if takes else 1
        else:
            overrides.append(arg)
            i += 1
    return flags, overrides


def user_error(err: BaseException) -> str | None:
    """The message of a bad-input error (bad config value, missing data, bad checkpoint, a
    run file mlbreg did not write) anywhere in the exception chain, or None for a real crash
    (and for an I/O error of the machine, which `mlbreg.cli` turns into one line)."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    user_errors = (
        ConfigError,
        DataNotFoundError,
        CheckpointError,
        RunFileError,
        ConfigCompositionException,
        OverrideParseException,
    )
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, user_errors):
            # Hydra appends its config search path to an unknown option: not the user's concern
            message = _unknown_key(str(err)) or str(err).split("\nConfig search path")[0].strip()
            if "Could not find 'model/" in message:
                message += f"\nor an architecture by name: {HOW_TO_LIST}"
            return message
        err = err.__cause__ or err.__context__
    return None


def _unknown_key(message: str) -> str | None:
    """Hydra's answer to a mistyped key (`lamda=0.1`) advises `+lamda=0.1`, which would
    train with the default λ: name the key and the likely intended one instead."""

    match = re.match(r"Could not override '([\w.]+)'", message)
    if not match:
        return None
    key = match.group(1)
    group, _, name = key.rpartition(".")
    valid = known_keys() if not group else known_keys(group, None) if group in GROUPS else None
    if valid is None or name in valid:
        return None
    return unknown_key_message(key, valid)


def preset_override(name: str) -> str:
    """The override that loads the preset conf/experiment/NAME.yaml."""
    return f"+experiment={name}"


def _normalize_presets(overrides: list[str]) -> list[str]:
    """`experiment=NAME` is accepted as `+experiment=NAME` (a common slip)."""
    return [
        preset_override(o.split("=", 1)[1]) if o.split("=", 1)[0] in ("experiment", "+experiment") else o for o in overrides
    ]


def sweep_jobs(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """The jobs of `mlbreg train -m <overrides>`: (the job's overrides, its composed config).

    The same expansion as Hydra's basic sweeper: the composed config's `hydra.sweeper.params`
    (a preset's grid) followed by the command line's overrides, as a cartesian product."""
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    register_resolvers()
    # launcher settings do not change which runs a sweep makes (and their plugins need not be importable)
    overrides = [
        o for o in _normalize_presets(overrides) if not o.lstrip("+~").startswith(("hydra/launcher", "hydra.launcher"))
    ]
    with initialize_config_dir(config_dir(), version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        try:
            base = hydra.compose_config("train", overrides, run_mode=RunMode.MULTIRUN, from_shell=True)
        except Exception as err:  # noqa: BLE001 - a bad override is the user's input
            raise SweepError(f"sweep {' '.join(overrides)!r}: {err}") from err
        params = OmegaConf.select(base, "hydra.sweeper.params") or {}
        arguments = [f"{k}={v}" for k, v in params.items()] + overrides
        jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)[0]
        out = []
        for job in jobs:
            try:
                cfg = hydra.compose_config("train", job, run_mode=RunMode.RUN, from_shell=True)
            except Exception as err:  # noqa: BLE001
                raise SweepError(f"sweep job {' '.join(job)!r}: {err}") from err
            with open_dict(cfg):
                del cfg["hydra"]
            out.append((job, cfg))
    return out


def expand_sweep(overrides: list[str]) -> list[str]:
    """The run names (`dataset/model/method/slug`) that `mlbreg train -m <overrides>` produces."""
    return [run_name(cfg) for _, cfg in sweep_jobs(overrides)]
