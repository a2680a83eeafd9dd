"""`mlbreg <command> ...`: hands the arguments to the command's module.

Nothing else happens here: `train` goes through Hydra (`mlbreg.hydra_glue.run_hydra`) to
`mlbreg.train.train(cfg, run_dir)`; every other command's module has `main(argv)`.
"""

from __future__ import annotations

import importlib
import os
import sys

from .failures import Stopped, describe, stop_signals_raise
from .status import Status

USAGE = """usage: mlbreg <command> [args]

commands:
  train   [hydra overrides]  train one run (or a sweep with -m), e.g.
          mlbreg train dataset=cifar10 model=resnet18 lam=1.0 m=100
          mlbreg train -m lam=0.01,0.03,0.1 seed=0,1,2
  tune    --target-sparsity S [hydra overrides]
                             find the λ whose run ends at sparsity S (±0.5 pp), e.g.
          mlbreg tune --target-sparsity 0.95 model=mlp epochs=20
  report  DIR [DIR ...] [--out OUT] [--sweep "OVERRIDES"]
                             tables and plots from run / sweep directories
                             (mlbreg report --help for the options)
  export  RUN_DIR [--out FILE]   the trained model as a compact sparse safetensors file
  eval    RUN_DIR_OR_FILE        test accuracy of the exported (or saved) model
  bench   RUN_DIR [--batch-sizes 1,128] [--max-rounds 15]
                             inference latency: dense torch vs the sparse CPU backends
                             (interleaved rounds until the spread is small; median, IQR)
  a paper preset: mlbreg train -m +experiment=table1_resnet18
"""


# commands besides train and report: the module that holds each one's `main(argv)`
COMMANDS = {"tune": ".tune", "export": ".export", "eval": ".evaluate", "bench": ".bench"}
# how each command that writes is told to write elsewhere (the way out of a full or read-only disk)
WRITES_TO = {"train": "output_root=DIR", "tune": "output_root=DIR", "report": "--out PATH", "export": "--out PATH"}


def _train(argv: list[str]) -> int:
    from .hydra_glue import run_hydra

    return run_hydra(argv, _train_job)


def _train_job(cfg, run_dir: str) -> dict:
    """One `mlbreg train` job: train (or resume, or skip) the run in `run_dir`."""
    from .train import train  # imported late: `mlbreg --help` stays fast

    outcome = train(cfg, run_dir)
    status = outcome["status"]
    if status == "busy":
        print(f"mlbreg: {run_dir} {outcome['message']}")
    elif outcome.get("skipped"):
        print(f"mlbreg: finished, skipped: {run_dir}: {_final_line(outcome)} (resume=false trains it again)")
    elif status == Status.FINISHED:
        print(f"mlbreg: finished {run_dir}: {_final_line(outcome)}")
    else:
        print(f"mlbreg: run {status}: {outcome.get('message', '')}", file=sys.stderr)
    if status == Status.INTERRUPTED and outcome.get("signal"):
        # the run is checkpointed; a signal also ends the sweep it belongs to (SystemExit
        # passes through Hydra's per-job error handling, an Exception would not)
        raise SystemExit(128 + int(outcome["signal"]))
    # what a sweeper or a Hydra callback gets back: the run's final metrics row
    return dict(outcome.get("final") or {}, status=status, run_dir=str(run_dir))


def _final_line(outcome: dict) -> str:
    final = outcome.get("final") or {}
    parts = [
        f"test acc {final['test_acc_pct']:.2f}%" if "test_acc_pct" in final else None,
        f"sparsity {final['sparsity_pct']:.2f}%" if "sparsity_pct" in final else None,
        f"training FLOPs {final['train_flops_vs_sgd']:.3g}x SGD" if "train_flops_vs_sgd" in final else None,
        f"{outcome.get('epoch')} epochs",
        f"resumed at step {outcome['resumed_from']}" if outcome.get("resumed_from") is not None else None,
    ]
    line = ", ".join(p for p in parts if p)
    # a finished run's message is a note about its result (every weight zero)
    return f"{line}; note: {outcome['message']}" if outcome.get("message") else line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        # SIGTERM / SIGUSR2 before the training loop (or between a tune's probes) end the
        # command with one line; inside the loop, its StopGuard checkpoints first
        with stop_signals_raise():
            return _command(command, rest)
    except KeyboardInterrupt:  # Ctrl-C before training started (training itself checkpoints)
        print("mlbreg: interrupted", file=sys.stderr)
        return 130
    except Stopped as stop:
        what = (
            " before training started; nothing was lost (run the same command again to start or resume)"
            if command in ("train", "tune")
            else ""
        )
        print(f"mlbreg {command}: stopped by {stop.name}{what}", file=sys.stderr)
        return 128 + stop.signum
    except BrokenPipeError:  # `mlbreg report ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:  # a full disk, a read-only folder: one line naming the path and the cause
        message = describe(err, WRITES_TO.get(command))
        if message is None:
            raise
        print(f"mlbreg {command}: {message}", file=sys.stderr)
        return 2


def _command(command: str, rest: list[str]) -> int:
    if command == "train":
        return _train(rest)
    if command == "report":
        from .report import main as report_main

        return report_main(rest)
    if command in COMMANDS:
        # each command's module has `main(argv) -> exit code`; imported late: `--help` stays fast
        return importlib.import_module(COMMANDS[command], __package__).main(rest)
    valid = ", ".join(["train", "report", *COMMANDS])
    print(f"mlbreg: unknown command {command!r}; valid: {valid}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
