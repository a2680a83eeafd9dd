"""`mlbreg tune --target-sparsity 0.95 [overrides]`: the λ whose run ends at a target sparsity.

LinBreg's and ML LinBreg's sparsity is set only indirectly, by λ; comparing methods at
equal sparsity needs the λ that lands there. The final sparsity grows with λ, and
logit(sparsity) is close to linear in log λ over the range that matters, so the search
works on those two scales:

1. bracket: from the configured λ, multiply or divide by `--factor` (default 4), or by up
   to its cube when the secant through the last two probes points that far, until one
   probe ends below the target and one above;
2. narrow: regula falsi on (log λ, logit sparsity) between the two sides, with a
   bisection step whenever the same side moved twice in a row (the Illinois idea: the
   bracket shrinks from both ends) or the interpolated λ falls too close to an end.

It stops at the first probe within `--tolerance` (default 0.005, ±0.5 percentage points)
or after `--max-probes` probes. Each probe is an ordinary run directory, the one
`mlbreg train lam=<λ> ...` would use, trained (or resumed, or skipped when finished) by
`mlbreg.train.train`: the search is deterministic, so a tune started again after a kill
proposes the same λs, reuses every finished probe and resumes the one that was cut off.
λ is rounded to 4 significant digits so probe directories have readable names.

One tune is one Hydra job: `-m seed=0,1,2` runs three tunes (on any launcher, Slurm
included); the tune's own record, `tune.csv` (one row per probe) and `result.json`, is in
`<output_root>/tune/<name>/`.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from .config import ConfigError, digest, identity, run_name, validate
from .hydra_glue import run_hydra
from .methods import METHODS, method_class
from .rundir import atomic_write_bytes
from .status import Status
from .train import train

TUNE_COLUMNS = ["probe", "lam", "sparsity_pct", "test_acc_pct", "status", "reused", "seconds", "run_dir"]


class TuneError(ValueError):
    """A tune that cannot start (bad option, a method without λ)."""


# -- the search, free of training ------------------------------------------------------------


def _logit(s: float) -> float:
    s = min(max(s, 1e-7), 1 - 1e-7)
    return math.log(s / (1 - s))


def _round(lam: float) -> float:
    return float(f"{lam:.4g}")


def search(
    probe: Callable[[float], float],
    lam0: float,
    target: float,
    tolerance: float = 0.005,
    max_probes: int = 12,
    factor: float = 4.0,
    lam_min: float = 1e-6,
    lam_max: float = 1e4,
) -> dict[str, Any]:
    """Find λ with |probe(λ) - target| <= tolerance; `probe` returns the final sparsity in [0, 1].

    Returns dict(reached, lam, sparsity, probes=[(λ, sparsity)], reason) where lam/sparsity
    are those of the probe closest to the target when not reached."""
    probes: list[tuple[float, float]] = []
    low = high = None  # (λ, s): the largest λ below the target, the smallest above
    last_side = None
    same_side = 0
    lam = _round(min(max(lam0, lam_min), lam_max))
    reason = f"no probe within ±{100 * tolerance:g} pp after {max_probes} probes"
    while len(probes) < max_probes:
        if any(lam == p for p, _ in probes):
            reason = f"the search converged to λ={lam:g} without reaching the tolerance (sparsity jumps there)"
            break
        s = probe(lam)
        probes.append((lam, s))
        if abs(s - target) <= tolerance:
            return dict(reached=True, lam=lam, sparsity=s, probes=probes, reason="")
        side = "low" if s < target else "high"
        same_side = same_side + 1 if side == last_side else 1
        last_side = side
        if side == "low" and (low is None or lam > low[0]):
            low = (lam, s)
        if side == "high" and (high is None or lam < high[0]):
            high = (lam, s)
        if low is not None and high is not None:
            lam = _between(low, high, target, bisect=same_side >= 2)
        elif high is None:  # every probe so far is too dense: raise λ
            below = [p for p in probes if p[1] < target]
            if len(below) >= 3 and _logit(below[-1][1]) - _logit(below[-3][1]) < 0.01:
                reason = f"sparsity stays at {100 * s:.2f}% as λ grows (λ up to {lam:g}): the target is out of reach"
                break
            step = _step(probes, target, factor)
            if lam * step > lam_max:
                reason = f"λ would exceed {lam_max:g} without reaching the target"
                break
            lam = _round(lam * step)
        else:  # every probe so far is too sparse: lower λ
            step = _step(probes, target, factor)
            if lam / step < lam_min:
                reason = f"λ would go below {lam_min:g} with the sparsity still above the target"
                break
            lam = _round(lam / step)
    best = min(probes, key=lambda p: abs(p[1] - target))
    return dict(reached=False, lam=best[0], sparsity=best[1], probes=probes, reason=reason)


def _step(probes: list[tuple[float, float]], target: float, factor: float) -> float:
    """The λ factor of the next bracketing probe: `factor`, or more (up to factor³) when
    the secant through the last two probes says the target is that much further away."""
    if len(probes) < 2:
        return factor
    (l1, s1), (l2, s2) = probes[-2], probes[-1]
    slope = (_logit(s2) - _logit(s1)) / (math.log(l2) - math.log(l1))
    if slope <= 0:  # no progress (or noise): the plain step
        return factor
    distance = abs(_logit(target) - _logit(s2)) / slope
    return min(max(math.exp(distance), factor), factor**3)


def _between(low: tuple[float, float], high: tuple[float, float], target: float, bisect: bool) -> float:
    """The next λ strictly inside (low λ, high λ): interpolated on (log λ, logit s), or the
    geometric midpoint when bisecting or when the interpolation hugs an end."""
    a, b = math.log(low[0]), math.log(high[0])
    mid = (a + b) / 2
    x = mid
    if not bisect:
        fa, fb = _logit(low[1]) - _logit(target), _logit(high[1]) - _logit(target)
        if fb != fa:
            x = a - fa * (b - a) / (fb - fa)
        if not a + 0.1 * (b - a) <= x <= b - 0.1 * (b - a):
            x = mid
    lam = _round(math.exp(x))
    if not low[0] < lam < high[0]:  # rounding landed on an end: the bracket is λ-tight
        lam = _round(math.exp(mid))
    return lam


# -- probes: ordinary runs --------------------------------------------------------------------


def probe_config(cfg: DictConfig, lam: float) -> DictConfig:
    probe = copy.deepcopy(cfg)
    OmegaConf.set_readonly(probe, False)
    with open_dict(probe):
        probe.lam = lam
        # a probe another tune (another seed's job, say) is training: wait for it and reuse it
        probe.wait_for_lock = True
    return probe


def probe_dir(cfg: DictConfig) -> Path:
    """The run dir `mlbreg train` gives this config (conf/train.yaml: hydra.run.dir)."""
    return Path(cfg.output_root) / run_name(cfg)


def tune_name(cfg: DictConfig, target: float) -> str:
    """`<dataset>/<model>/<method>/target<S>_seed<N>_<hash>`: the run's identity without λ, plus the target."""
    ident = identity(cfg)
    ident.pop("lam", None)
    return (
        f"{cfg.dataset.name}/{cfg.model.name}/{cfg.method.name}/"
        f"target{target:g}_seed{cfg.seed}_{digest(dict(ident, target=target))}"
    )


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TUNE_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue().encode()))


def _probe_row(n: int, lam: float, final: dict, outcome: dict, seconds: float, run_dir) -> dict[str, Any]:
    """tune.csv's row of probe `n`."""
    return dict(
        probe=n,
        lam=lam,
        sparsity_pct=final["sparsity_pct"],
        test_acc_pct=final["test_acc_pct"],
        status=outcome["status"],
        reused=bool(outcome.get("skipped")),
        seconds=round(seconds, 2),
        run_dir=str(run_dir),
    )


def _probe_line(n, lam, final, sparsity, target, tolerance, outcome, seconds, run_dir) -> str:
    """The line printed after probe `n`."""
    side = "ok" if abs(sparsity - target) <= tolerance else ("below" if sparsity < target else "above")
    return (
        f"mlbreg tune: probe {n}: λ={lam:g} -> sparsity {final['sparsity_pct']:.2f}% ({side}; target "
        f"{100 * target:g} ± {100 * tolerance:g}), test acc {final['test_acc_pct']:.2f}%"
        f"{', reused' if outcome.get('skipped') else f', {seconds:.1f} s'}  {run_dir}"
    )


class _Interrupted(Exception):
    def __init__(self, outcome):
        self.outcome = outcome


class _ProbeFailed(Exception):
    def __init__(self, outcome, run_dir):
        self.outcome, self.run_dir = outcome, run_dir


def tune(
    cfg: DictConfig,
    target: float,
    tune_dir: str | Path,
    tolerance: float = 0.005,
    max_probes: int = 12,
    factor: float = 4.0,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the search for `cfg` (its λ is the start); returns the result dict (also in
    tune_dir/result.json) with status "finished" (target reached), "unreachable",
    "interrupted" or the failed probe's status."""
    tune_dir = Path(tune_dir)
    tune_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    outcomes: dict[float, dict[str, Any]] = {}

    def probe(lam: float) -> float:
        probe_cfg = probe_config(cfg, lam)
        run_dir = probe_dir(probe_cfg)
        t0 = time.perf_counter()
        outcome = train(probe_cfg, run_dir)
        seconds = time.perf_counter() - t0
        if outcome["status"] == Status.INTERRUPTED:
            raise _Interrupted(outcome)
        if outcome["status"] != Status.FINISHED:
            raise _ProbeFailed(outcome, run_dir)
        final = outcome.get("final") or {}
        outcomes[lam] = dict(final, run_dir=str(run_dir))
        rows.append(_probe_row(len(rows) + 1, lam, final, outcome, seconds, run_dir))
        _write_csv(tune_dir / "tune.csv", rows)
        sparsity = final["sparsity_pct"] / 100
        echo(_probe_line(len(rows), lam, final, sparsity, target, tolerance, outcome, seconds, run_dir))
        return sparsity

    base = dict(target_sparsity=target, tolerance=tolerance, method=cfg.method.name, start_lam=float(cfg.lam))
    try:
        found = search(probe, float(cfg.lam), target, tolerance, max_probes, factor)
    except _Interrupted as stop:
        result = dict(
            base,
            status=Status.INTERRUPTED,
            probes=len(rows),
            signal=stop.outcome.get("signal"),
            message=f"interrupted in probe {len(rows) + 1}; run the same command again to resume",
        )
    except _ProbeFailed as err:
        result = dict(
            base,
            status=err.outcome["status"],
            probes=len(rows),
            run_dir=str(err.run_dir),
            message=f"probe {len(rows) + 1} {err.outcome['status']}: {err.outcome.get('message', '')}",
        )
    else:
        best = outcomes[found["lam"]]
        result = dict(
            base,
            status=Status.FINISHED if found["reached"] else "unreachable",
            probes=len(found["probes"]),
            lam=found["lam"],
            sparsity_pct=best["sparsity_pct"],
            test_acc_pct=best["test_acc_pct"],
            run_dir=best["run_dir"],
            message=found["reason"],
        )
    (tune_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


# -- the command ------------------------------------------------------------------------------


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="mlbreg tune",
        description="Find λ so that a LinBreg / ML LinBreg run ends at a target sparsity. "
        "Other arguments are mlbreg train's Hydra overrides (the configured lam is the first probe); "
        "-m runs one tune per job of a sweep.",
    )
    parser.add_argument("--target-sparsity", type=float, required=True, help="e.g. 0.95")
    parser.add_argument("--tolerance", type=float, default=0.005, help="absolute, in [0, 1] (default 0.005: ±0.5 pp)")
    parser.add_argument("--max-probes", type=int, default=12, help="trainings at most (default 12)")
    parser.add_argument("--factor", type=float, default=4.0, help="λ step while bracketing (default 4)")
    options, rest = parser.parse_known_args(argv)
    if not 0 < options.target_sparsity < 1:
        parser.error(f"invalid --target-sparsity {options.target_sparsity:g}: must be in (0, 1), e.g. 0.95")
    if not 0 < options.tolerance < 0.5:
        parser.error(f"invalid --tolerance {options.tolerance:g}: must be in (0, 0.5), e.g. 0.005")
    if options.max_probes < 1:
        parser.error(f"invalid --max-probes {options.max_probes}: must be >= 1")
    if options.factor <= 1:
        parser.error(f"invalid --factor {options.factor:g}: must be > 1")
    return options, rest


def main(argv: list[str]) -> int:
    options, rest = _parse(argv)
    _register_name_resolver(options.target_sparsity)

    def job(cfg: DictConfig, tune_dir: str) -> dict[str, Any]:
        result = tune(cfg, options.target_sparsity, tune_dir, options.tolerance, options.max_probes, options.factor)
        if result["status"] == Status.FINISHED:
            print(
                f"mlbreg tune: λ={result['lam']:g} gives sparsity {result['sparsity_pct']:.2f}% (target "
                f"{100 * options.target_sparsity:g} ± {100 * options.tolerance:g}) after {result['probes']} probes, "
                f"test acc {result['test_acc_pct']:.2f}%: {result['run_dir']}"
            )
        elif result["status"] == "unreachable":
            print(
                f"mlbreg tune: target sparsity {100 * options.target_sparsity:g}% not reached: {result['message']}. "
                f"Closest: λ={result['lam']:g}, sparsity {result['sparsity_pct']:.2f}%, test acc "
                f"{result['test_acc_pct']:.2f}%: {result['run_dir']}. More epochs, another start "
                f"(lam=...) or a looser --tolerance may reach it.",
                file=sys.stderr,
            )
        else:
            print(f"mlbreg tune: {result['message']}", file=sys.stderr)
        if result["status"] == Status.INTERRUPTED and result.get("signal"):
            raise SystemExit(128 + int(result["signal"]))  # ends a sweep, as mlbreg train does
        return result

    return run_hydra(
        rest,
        job,
        extra_overrides=(
            "hydra.run.dir=${output_root}/tune/${mlbreg_tune_name:}",
            "hydra.sweep.subdir=tune/${mlbreg_tune_name:}",
        ),
    )


def _register_name_resolver(target: float) -> None:
    def _name(*, _root_):
        validate(_root_)
        method = method_class(_root_.method.name)
        if not method.lam_sets_sparsity:
            hint = " (its sparsity is set directly: mlbreg train sparsity=...)" if method.needs_sparsity else ""
            tunable = [name for name in METHODS if method_class(name).lam_sets_sparsity]
            raise ConfigError(
                f"invalid method={_root_.method.name} for mlbreg tune{hint}: it tunes λ of {' and '.join(tunable)}"
            )
        return tune_name(_root_, target)

    # replaced on each call: the name holds this call's target
    OmegaConf.register_new_resolver("mlbreg_tune_name", _name, replace=True)
