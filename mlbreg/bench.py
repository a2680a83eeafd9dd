"""`mlbreg bench RUN_DIR`: measured inference latency of a run's model on this CPU, dense
torch layers vs the sparse CPU backends (the project's native kernels, SparseProp).

The sparse models are the training's own machinery (`mlbreg.backends.make_backend` and the
coarse-step hook `before_step("sparse")`), not new kernels: see `sparse_copy`. Every
backend gets its own copy of the model, so the timings can interleave: per round, per batch
size, every backend is timed once with `torch.utils.benchmark.Timer.blocked_autorange`, and
the rounds of each are merged into one median (a change of machine load hits all alike).
Inputs are random (the kernels' cost does not depend on the values); every sparse model's
output is compared with the dense one on the same input.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import torch
from torch import nn

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
    from .backends import make_backend
    sparse = copy.deepcopy(model).eval()
    try:
        backend = make_backend(name, sparse, torch.device("cpu"), "mllinbreg", in_shape=in_shape, force=True)
    except (RuntimeError, ValueError) as err:
        raise NotRunnable(str(err)) from err
    if backend.name != name:   # make_backend never substitutes for a named backend; guard anyway
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


def time_models(models: dict[str, nn.Module], inputs: dict[int, torch.Tensor], threads: int, min_run_time: float,
                rounds: int) -> dict[tuple[str, int], Any]:
    """(label, batch size) -> merged `torch.utils.benchmark.Measurement` over interleaved rounds."""
    from torch.utils import benchmark
    runs: dict[tuple[str, int], list] = {(label, b): [] for b in inputs for label in models}
    with torch.no_grad():                    # grad mode is per thread; the Timer runs in this one
        for _ in range(rounds):
            for b, x in inputs.items():
                for label, model in models.items():
                    timer = benchmark.Timer("model(x)", globals=dict(model=model, x=x), num_threads=threads,
                                            label="mlbreg bench", sub_label=f"batch {b}", description=label)
                    runs[(label, b)].append(timer.blocked_autorange(min_run_time=min_run_time))
    return {key: benchmark.Measurement.merge(ms)[0] for key, ms in runs.items()}


def main(argv: list[str]) -> int:
    from . import export
    from .env import cpu_model
    from .metrics import sparsity_summary
    p = argparse.ArgumentParser(prog="mlbreg bench", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (or a file of `mlbreg export`)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 128], metavar="B,B,...",
                   help="batch sizes to time (default 1,128)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch threads (default: torch's, here {torch.get_num_threads()})")
    p.add_argument("--backends", default=",".join(SPARSE_BACKENDS),
                   help=f"sparse backends to try (default {','.join(SPARSE_BACKENDS)})")
    p.add_argument("--min-run-time", type=float, default=0.2,
                   help="seconds of each blocked_autorange (one per backend, batch size and round; default 0.2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    args = p.parse_args(argv)
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in SPARSE_BACKENDS]
    if unknown:
        print(f"mlbreg bench: unknown backend {unknown[0]!r}; valid: {', '.join(SPARSE_BACKENDS)}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("mlbreg bench: --threads must be at least 1", file=sys.stderr)
        return 2
    try:
        info = export.resolve(args.run_dir)
        model = export.model_from(info, "cpu")
    except export.ExportError as err:
        print(f"mlbreg bench: {err}", file=sys.stderr)
        return 2
    previous_threads = torch.get_num_threads()
    threads = args.threads or previous_threads
    torch.set_num_threads(threads)
    try:
        return _bench(args, info, model, wanted, threads, cpu_model(), sparsity_summary(model))
    finally:
        torch.set_num_threads(previous_threads)


def _bench(args, info, model, wanted, threads, cpu, sparsity) -> int:
    in_shape = tuple(info["shapes"][1])
    cfg = info["cfg"]
    models: dict[str, nn.Module] = {"dense": model}
    backends: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in wanted:
        try:
            models[name], backends[name] = sparse_copy(model, name, in_shape)
        except NotRunnable as err:
            skipped[name] = str(err)
    native = backends.get("native")
    native_path = f"{native.simd_path} path" if native is not None else \
        f"not used ({skipped.get('native', 'not requested')})"

    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn((b,) + in_shape, generator=gen) for b in args.batch_sizes}
    diffs: dict[tuple[str, int], float] = {}
    with torch.no_grad():                   # doubles as the warm-up of every model and batch size
        for b, x in inputs.items():
            ref = model(x)
            for name, m in models.items():
                diffs[(name, b)] = float((m(x) - ref).abs().max()) if name != "dense" else 0.0
    times = time_models(models, inputs, threads, args.min_run_time, max(1, args.rounds))

    print(f"mlbreg bench: {info['file']} ({cfg.dataset.name}/{cfg.model.name}/{cfg.method.name}; "
          f"input {'x'.join(map(str, in_shape))}; prunable weights {sparsity['sparsity_pct']:.2f}% zeros)")
    print(f"  CPU: {cpu}; {threads} thread{'s' if threads != 1 else ''}; torch {torch.__version__}; "
          f"native kernels: {native_path}")
    print(f"  eval mode, torch.no_grad; torch.utils.benchmark blocked_autorange, {max(1, args.rounds)} interleaved "
          f"rounds of >= {args.min_run_time:g} s each; time / dense < 1: faster than dense")
    header = f"  {'backend':<11} {'batch':>6} {'median ms':>11} {'IQR ms':>9} {'time / dense':>13} " \
             f"{'max |out - dense|':>18}  sparse layers"
    print(header)
    for b in args.batch_sizes:
        dense_median = times[("dense", b)].median
        for name in models:
            t = times[(name, b)]
            be = backends.get(name)
            layers = (f"{sum(layer.swapped for layer in be.layers)} of {len(be.layers)}" if be is not None else "-")
            diff = f"{diffs[(name, b)]:.1e}" if name != "dense" else "-"
            print(f"  {name:<11} {b:>6} {1e3 * t.median:>11.4f} {1e3 * t.iqr:>9.4f} {t.median / dense_median:>12.2f}x "
                  f"{diff:>18}  {layers}")
    for name, be in backends.items():
        dense_kept = [f"{layer.name} ({layer.why})" for layer in be.layers if not layer.swapped]
        if dense_kept:
            print(f"  {name}: kept dense: {', '.join(dense_kept)}")
    for name, why in skipped.items():
        print(f"  {name}: not run: {why}")
    return 0
