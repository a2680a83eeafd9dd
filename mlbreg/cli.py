"""`mlbreg train|report ...`: hands the arguments to Hydra (train) or argparse (report).

Nothing else happens here: the work is in `mlbreg.train.train(cfg, run_dir)` and
`mlbreg.report`.
"""
from __future__ import annotations

import sys
from pathlib import Path

USAGE = """usage: mlbreg <command> [args]

commands:
  train   [hydra overrides]  train one run (or a sweep with -m), e.g.
          mlbreg train dataset=cifar10 model=resnet18 lam=1.0 m=100
          mlbreg train -m lam=0.5,1,2 seed=0,1,2
  report  DIR [DIR ...]      tables and plots from run / sweep directories
"""


def config_dir() -> str:
    """The Hydra config tree: the repository's conf/ (editable install) or the installed copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "train.yaml").exists():
            return str(candidate)
    raise FileNotFoundError(f"mlbreg's config tree (conf/train.yaml) was not found next to {here}")


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    from .config import run_name

    def _run_name(*, _root_):
        return run_name(_root_)

    if not OmegaConf.has_resolver("mlbreg_run_name"):
        OmegaConf.register_new_resolver("mlbreg_run_name", _run_name)


def _train(argv: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    result = {}

    @hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
    def hydra_main(cfg):
        from .train import train  # imported late: `mlbreg --help` stays fast
        outcome = train(cfg, HydraConfig.get().runtime.output_dir)
        status = outcome["status"]
        if status != "finished":
            print(f"mlbreg: run {status}: {outcome.get('message', '')}", file=sys.stderr)
        result["status"] = status
        return status

    sys.argv = [sys.argv[0]] + argv
    hydra_main()
    # a single run that did not finish exits non-zero; in a sweep each job reports itself
    return 0 if result.get("status") in (None, "finished") else 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return _train(rest)
    if command == "report":
        from .report import main as report_main
        return report_main(rest)
    print(f"mlbreg: unknown command {command!r}; valid: train, report\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
