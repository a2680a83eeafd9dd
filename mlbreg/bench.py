"""`mlbreg bench RUN_DIR`: measured inference latency of a run's model on this CPU, dense
torch layers vs the sparse CPU backends (the project's native kernels, SparseProp).

The sparse models are the training's own machinery (`mlbreg.backends.make_backend` and the
coarse-step hook `before_step("sparse")`), not new kernels: see `sparse_copy`. Every
backend gets its own copy of the model, so the timings can interleave: per round, per batch
size, every backend is timed once, in an order that rotates between rounds, and rounds repeat
until the spread over rounds of every timing is small or a cap is reached (`bench_rounds`); the
reported time is the median over the rounds, printed with its IQR and the spread in %, and a
WARNING names every timing whose spread stayed large. torch's thread count is set once for the
whole bench, one backend runs at a time, and each timing starts with untimed calls (a thread
pool waking up, or another one still spinning, is not timed). Inputs are random (the kernels'
cost does not depend on the values); every sparse model's output is compared with the dense one
on the same input.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import torch
from torch import nn

from . import bench_rounds, export
from .backends import make_backend
from .env import cpu_model
from .metrics import sparsity_summary

SPARSE_BACKENDS = ("native", "sparseprop")


class NotRunnable(Exception):
    """A backend that cannot serve this model here (the message says why)."""


def sparse_copy(model: nn.Module, name: str, in_shape) -> tuple[nn.Module, Any]:
    """A copy of `model` (eval mode) whose eligible layers run backend `name`'s sparse forward.

    The backends are built for ML LinBreg's coarse training steps; pure inference needs only two
    choices of theirs. `force=True`: their own per-layer choice times forward + backward at the
    training batch size, which is a training question; here every eligible layer is swapped
    and this bench's timings answer the inference one. `before_step("sparse")` outside a training
    loop: without an optimizer the structure is `w != 0`, the swapped forwards run under no_grad
    (no graph, no saved tensors kept) and BatchNorm in eval mode uses the running statistics, so
    nothing else is needed; `use_dense()` would undo it."""
    sparse = copy.deepcopy(model).eval()
    try:
        backend = make_backend(name, sparse, torch.device("cpu"), "mllinbreg", in_shape=in_shape, force=True)
    except (RuntimeError, ValueError) as err:
        raise NotRunnable(str(err)) from err
    if backend.name != name:  # make_backend never substitutes for a named backend; guard anyway
        raise NotRunnable(f"make_backend gave {backend.name!r} for {name!r}")
    with torch.no_grad():
        backend.before_step("sparse")
    if not any(layer.swapped for layer in backend.layers):
        reasons = "; ".join(f"{layer.name}: {layer.why}" for layer in backend.layers)
        raise NotRunnable(f"no layer is eligible ({reasons})")
    return sparse, backend


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, e.g. 1,128; got {text!r}")
    return sizes


def time_models(
    models: dict[str, nn.Module], inputs: dict[int, torch.Tensor], min_run_time: float, opts: bench_rounds.RoundOptions
) -> tuple[dict[tuple[str, int], list[float]], str]:
    """(label, batch size) -> seconds per call of each round, and why the rounds stopped. One model
    runs at a time, under the thread count set once by `main`; `bench_rounds.time_call` makes its
    untimed warm-up calls after each switch."""

    def measure(label: str, b: int) -> float:
        model, x = models[label], inputs[b]
        return bench_rounds.time_call(lambda: model(x), min_run_time)

    with torch.no_grad():
        return bench_rounds.run_rounds(measure, list(models), list(inputs), opts)


def _parser() -> argparse.ArgumentParser:
    r = bench_rounds
    p = argparse.ArgumentParser(prog="mlbreg bench", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (or a file of `mlbreg export`)")
    p.add_argument(
        "--batch-sizes", type=_batch_sizes, default=[1, 128], metavar="B,B,...", help="batch sizes to time (default 1,128)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"torch threads, set once for the whole bench (default: torch's, here {torch.get_num_threads()})",
    )
    p.add_argument(
        "--backends", default=",".join(SPARSE_BACKENDS), help=f"sparse backends to try (default {','.join(SPARSE_BACKENDS)})"
    )
    p.add_argument(
        "--min-run-time", type=float, default=0.2, help="seconds of timed calls per backend, batch size and round (default 0.2)"
    )
    p.add_argument("--min-rounds", type=int, default=r.MIN_ROUNDS, help=f"rounds always run (default {r.MIN_ROUNDS})")
    p.add_argument(
        "--max-rounds",
        type=int,
        default=r.MAX_ROUNDS,
        help=f"stop after this many rounds even if a spread is still large (default {r.MAX_ROUNDS})",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=r.MAX_SECONDS,
        help=f"start no round after this many seconds of timing, once --min-rounds are done (default {r.MAX_SECONDS:g})",
    )
    p.add_argument(
        "--max-spread",
        type=float,
        default=100 * r.MAX_SPREAD,
        metavar="PCT",
        help="stop once every IQR over rounds is at most PCT%% of its median; warn about any above "
        f"(default {100 * r.MAX_SPREAD:g})",
    )
    p.add_argument("--rounds", type=int, default=None, help="exactly this many rounds (sets --min-rounds and --max-rounds)")
    return p


def _round_options(args) -> bench_rounds.RoundOptions | str:
    """The round options, or what is wrong with them."""
    lo, hi = (args.rounds, args.rounds) if args.rounds is not None else (args.min_rounds, args.max_rounds)
    if lo < 2 or hi < lo:
        return f"need 2 <= --min-rounds <= --max-rounds (a spread needs 2 rounds; got {lo}, {hi})"
    if args.max_seconds <= 0 or args.max_spread <= 0 or args.min_run_time <= 0:
        return "--max-seconds, --max-spread and --min-run-time must be positive"
    return bench_rounds.RoundOptions(lo, hi, args.max_seconds, args.max_spread / 100)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in SPARSE_BACKENDS]
    if unknown:
        print(f"mlbreg bench: unknown backend {unknown[0]!r}; valid: {', '.join(SPARSE_BACKENDS)}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("mlbreg bench: --threads must be at least 1", file=sys.stderr)
        return 2
    opts = _round_options(args)
    if isinstance(opts, str):
        print(f"mlbreg bench: {opts}", file=sys.stderr)
        return 2
    try:
        info = export.resolve(args.run_dir)
        model = export.model_from(info, "cpu")
    except export.ExportError as err:
        print(f"mlbreg bench: {err}", file=sys.stderr)
        return 2
    previous_threads = torch.get_num_threads()
    threads = args.threads or previous_threads
    torch.set_num_threads(threads)  # once, for every backend and round; restored on the way out
    try:
        return _bench(args, opts, info, model, wanted, threads, cpu_model(), sparsity_summary(model))
    finally:
        torch.set_num_threads(previous_threads)


def _bench(args, opts, info, model, wanted, threads, cpu, sparsity) -> int:
    in_shape = tuple(info["shapes"][1])
    models: dict[str, nn.Module] = {"dense": model}
    backends: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in wanted:
        try:
            models[name], backends[name] = sparse_copy(model, name, in_shape)
        except NotRunnable as err:
            skipped[name] = str(err)
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn((b,) + in_shape, generator=gen) for b in args.batch_sizes}
    diffs: dict[tuple[str, int], float] = {}
    with torch.no_grad():  # doubles as the first warm-up of every model and batch size
        for b, x in inputs.items():
            ref = model(x)
            for name, m in models.items():
                diffs[(name, b)] = float((m(x) - ref).abs().max()) if name != "dense" else 0.0
    per_round, reason = time_models(models, inputs, args.min_run_time, opts)
    stats = bench_rounds.summarize(per_round)

    native = backends.get("native")
    native_path = f"{native.simd_path} path" if native is not None else f"not used ({skipped.get('native', 'not requested')})"
    _print_header(info, in_shape, sparsity, cpu, threads, native_path)
    rounds = len(next(iter(per_round.values())))
    print(
        f"  eval mode, torch.no_grad; {rounds} interleaved round{'s' if rounds != 1 else ''} ({reason}; "
        f"rounds {opts.min_rounds}-{opts.max_rounds}, at most {opts.max_seconds:g} s): per round every backend "
        f"and batch size timed once, one at a time in a rotating order, after {bench_rounds.WARMUP_SECONDS:g} s of "
        f"untimed calls, as the median of blocks of calls lasting >= {args.min_run_time:g} s"
    )
    print(
        f"  median: over the rounds; IQR: over the rounds; spread: IQR / median (warning above "
        f"{100 * opts.max_spread:g}%); time / dense < 1: faster than dense"
    )
    _print_table(stats, diffs, models, backends, args.batch_sizes, opts.max_spread)
    for line in bench_rounds.warning_lines(stats, opts.max_spread):
        print(f"  {line}")
    for name, be in backends.items():
        dense_kept = [f"{layer.name} ({layer.why})" for layer in be.layers if not layer.swapped]
        if dense_kept:
            print(f"  {name}: kept dense: {', '.join(dense_kept)}")
    for name, why in skipped.items():
        print(f"  {name}: not run: {why}")
    return 0


def _print_header(info, in_shape, sparsity, cpu, threads, native_path) -> None:
    cfg = info["cfg"]
    print(
        f"mlbreg bench: {info['file']} ({cfg.dataset.name}/{cfg.model.name}/{cfg.method.name}; "
        f"input {'x'.join(map(str, in_shape))}; prunable weights {sparsity['sparsity_pct']:.2f}% zeros)"
    )
    print(
        f"  CPU: {cpu}; {threads} thread{'s' if threads != 1 else ''}; torch {torch.__version__}; native kernels: {native_path}"
    )


def _print_table(stats, diffs, models, backends, batch_sizes, max_spread) -> None:
    print(
        f"  {'backend':<11} {'batch':>6} {'median ms':>11} {'IQR ms':>9} {'spread':>7} {'time / dense':>13} "
        f"{'max |out - dense|':>18}  sparse layers"
    )
    for b in batch_sizes:
        dense_median = stats[("dense", b)].median
        for name in models:
            t = stats[(name, b)]
            be = backends.get(name)
            layers = f"{sum(layer.swapped for layer in be.layers)} of {len(be.layers)}" if be is not None else "-"
            diff = f"{diffs[(name, b)]:.1e}" if name != "dense" else "-"
            spread = bench_rounds.pct(t.relative) + ("!" if t.relative > max_spread else "")
            print(
                f"  {name:<11} {b:>6} {1e3 * t.median:>11.4f} {1e3 * t.iqr:>9.4f} {spread:>7} "
                f"{t.median / dense_median:>12.2f}x {diff:>18}  {layers}"
            )
