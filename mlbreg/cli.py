"""`mlbreg train|report ...`: hands the arguments to Hydra (train) or argparse (report).

Nothing else happens here: the work is in `mlbreg.train.train(cfg, run_dir)` and
`mlbreg.report`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

USAGE = """usage: mlbreg <command> [args]

commands:
  train   [hydra overrides]  train one run (or a sweep with -m), e.g.
          mlbreg train dataset=cifar10 model=resnet18 lam=1.0 m=100
          mlbreg train -m lam=0.5,1,2 seed=0,1,2
  tune    --target-sparsity S [hydra overrides]
                             find the λ whose run ends at sparsity S (±0.5 pp), e.g.
          mlbreg tune --target-sparsity 0.95 model=mlp epochs=20
  report  DIR [DIR ...] [--out OUT] [--sweep "OVERRIDES"]
                             tables and plots from run / sweep directories
                             (mlbreg report --help for the options)
  export  RUN_DIR [--out FILE]   the trained model as a compact sparse safetensors file
  eval    RUN_DIR_OR_FILE        test accuracy of the exported (or saved) model
  bench   RUN_DIR [--batch-sizes 1,128]
                             inference latency: dense torch vs the sparse CPU backends
  a paper preset: mlbreg train -m +experiment=table1_resnet18
"""


# commands besides train and report: the module that holds each one's `main(argv)`
COMMANDS = {"tune": ".tune", "export": ".export", "eval": ".evaluate", "bench": ".bench"}


def config_dir() -> str:
    """The Hydra config tree: the repository's conf/ (editable install) or the installed copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "train.yaml").exists():
            return str(candidate)
    raise FileNotFoundError(f"mlbreg's config tree (conf/train.yaml) was not found next to {here}")


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    from .config import check_data, run_name, validate

    def _run_name(*, _root_):
        # Hydra resolves the run dir before it creates it: checking the config (and that
        # the data is there) here makes bad input fail before anything is written.
        validate(_root_)
        check_data(_root_)
        return run_name(_root_)

    if not OmegaConf.has_resolver("mlbreg_run_name"):
        OmegaConf.register_new_resolver("mlbreg_run_name", _run_name)


def _train(argv: list[str]) -> int:
    return run_hydra(argv, _train_job)


def _train_job(cfg, run_dir: str) -> dict:
    """One `mlbreg train` job: train (or resume, or skip) the run in `run_dir`."""
    from .train import train  # imported late: `mlbreg --help` stays fast
    outcome = train(cfg, run_dir)
    status = outcome["status"]
    if outcome.get("skipped"):
        print(f"mlbreg: {run_dir} finished earlier; kept (resume=false trains it again)", file=sys.stderr)
    elif status == "finished":
        print(f"mlbreg: finished {run_dir}: {_final_line(outcome)}")
    else:
        print(f"mlbreg: run {status}: {outcome.get('message', '')}", file=sys.stderr)
    if status == "interrupted" and outcome.get("signal"):
        # the run is checkpointed; a signal also ends the sweep it belongs to (SystemExit
        # passes through Hydra's per-job error handling, an Exception would not)
        raise SystemExit(128 + int(outcome["signal"]))
    # what a sweeper or a Hydra callback gets back: the run's final metrics row
    return dict(outcome.get("final") or {}, status=status, run_dir=str(run_dir))


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

    flags, overrides = _split_flags(argv)
    if argv != flags + overrides:
        # argparse would call the overrides after a flag "unrecognized arguments"
        print(f"mlbreg: Hydra flags go before the overrides: mlbreg train {' '.join(flags + overrides)}",
              file=sys.stderr)
        return 2
    _check_whole_sweeps()
    sys.argv = [sys.argv[0]] + argv + list(extra_overrides)
    # let Hydra re-raise instead of printing and exiting, so known user errors become one line
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        hydra_main()
    except Exception as err:  # noqa: BLE001 - turn known user errors into one clear line
        known = _user_error(err)
        if known is None:
            raise
        print(f"mlbreg: {known}", file=sys.stderr)
        return 2
    # a run that did not finish (diverged) makes the exit code non-zero, in a sweep too
    return 0 if all(s == "finished" for s in statuses) else 2


def _check_whole_sweeps() -> None:
    """Hydra composes every job of a sweep batch before it launches any
    (`Sweeper.validate_batch_is_legal`; without max_batch_size the batch is the whole sweep).
    Extend that check with mlbreg's config and data checks, so that a bad value in the
    seventh job stops the sweep before the first one starts, naming every bad job."""
    from hydra.plugins.sweeper import Sweeper
    from omegaconf import OmegaConf

    from .config import ConfigError, check_data, validate
    from .data import DataNotFoundError
    if getattr(Sweeper.validate_batch_is_legal, "_mlbreg", False):
        return
    composes = Sweeper.validate_batch_is_legal

    def validate_batch_is_legal(self, batch):
        composes(self, batch)
        loader = self.hydra_context.config_loader if getattr(self, "hydra_context", None) else self.config_loader
        # a cluster launcher checks on the submitting machine: CUDA and the data may be
        # on the compute nodes only, where each job checks them again when it starts
        local = "slurm" not in str(OmegaConf.select(self.config, "hydra.launcher._target_")).lower()
        bad: dict[str, list[str]] = {}     # message -> the jobs (overrides) it applies to
        for overrides in batch:
            cfg = loader.load_sweep_config(master_config=self.config, sweep_overrides=list(overrides))
            try:
                validate(cfg, environment=local)
                if local:
                    check_data(cfg)
            except (ConfigError, DataNotFoundError) as err:
                bad.setdefault(str(err), []).append(" ".join(overrides))
        if bad:
            lines = [f"{msg}  [{jobs[0]}]" if len(jobs) == 1 else f"{msg}  ({len(jobs)} jobs, e.g. [{jobs[0]}])"
                     for msg, jobs in bad.items()]
            raise ConfigError(f"{sum(map(len, bad.values()))} of {len(batch)} jobs of the sweep are invalid, "
                              "so none was started:" + "".join(f"\n  {line}" for line in lines))

    validate_batch_is_legal._mlbreg = True
    Sweeper.validate_batch_is_legal = validate_batch_is_legal


def _final_line(outcome: dict) -> str:
    final = outcome.get("final") or {}
    parts = [f"test acc {final['test_acc_pct']:.2f}%" if "test_acc_pct" in final else None,
             f"sparsity {final['sparsity_pct']:.2f}%" if "sparsity_pct" in final else None,
             f"training FLOPs {final['train_flops_vs_sgd']:.3g}x SGD" if "train_flops_vs_sgd" in final else None,
             f"{outcome.get('epoch')} epochs",
             f"resumed at step {outcome['resumed_from']}" if outcome.get("resumed_from") is not None else None]
    return ", ".join(p for p in parts if p)


# Hydra's flags that take a value (`--cfg job`, `-cn NAME`, `--info plugins`, ...)
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}


def _split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides), each in the given order."""
    flags, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            takes = arg in _FLAGS_WITH_VALUE and i + 1 < len(argv) and "=" not in argv[i + 1] \
                and not argv[i + 1].startswith("-")
            flags += argv[i:i + 2] if takes else [arg]
            i += 2 if takes else 1
        else:
            overrides.append(arg)
            i += 1
    return flags, overrides


def _user_error(err: BaseException) -> str | None:
    """The message of a bad-input error (bad config value, missing data, bad checkpoint)
    anywhere in the exception chain, or None for a real crash."""
    from .config import ConfigError
    from .data import DataNotFoundError
    from .rundir import CheckpointError
    from hydra.errors import ConfigCompositionException, OverrideParseException
    user_errors = (ConfigError, DataNotFoundError, CheckpointError, ConfigCompositionException,
                   OverrideParseException)
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, user_errors):
            # Hydra appends its config search path to an unknown option: not the user's concern
            return _unknown_key(str(err)) or str(err).split("\nConfig search path")[0].strip()
        err = err.__cause__ or err.__context__
    return None


def _unknown_key(message: str) -> str | None:
    """Hydra's answer to a mistyped key (`lamda=0.1`) advises `+lamda=0.1`, which would
    train with the default λ: name the key and the likely intended one instead."""
    import re

    from .config import GROUPS, known_keys, unknown_key_message
    match = re.match(r"Could not override '([\w.]+)'", message)
    if not match:
        return None
    key = match.group(1)
    group, _, name = key.rpartition(".")
    valid = known_keys() if not group else known_keys(group, None) if group in GROUPS else None
    if valid is None or name in valid:
        return None
    return unknown_key_message(key, valid)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            return _train(rest)
        if command == "report":
            from .report import main as report_main
            return report_main(rest)
        if command in COMMANDS:
            # each command's module has `main(argv) -> exit code`; imported late: `--help` stays fast
            import importlib
            return importlib.import_module(COMMANDS[command], __package__).main(rest)
    except KeyboardInterrupt:      # Ctrl-C before training started (training itself checkpoints)
        print("mlbreg: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:        # `mlbreg report ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    valid = ", ".join(["train", "report", *COMMANDS])
    print(f"mlbreg: unknown command {command!r}; valid: {valid}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
