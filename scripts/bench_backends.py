#!/usr/bin/env python
"""Per-step and per-epoch training time on this CPU: dense SGD, ML LinBreg on torch layers, and
ML LinBreg on SparseProp layers (ResNet-18, 32x32 inputs), in one run.

    python scripts/bench_backends.py                      # batch 128, densities 0.10/0.05/0.02, uniform+ERK
    python scripts/bench_backends.py --batch-size 64 --steps 2 --densities 0.02 --schemes uniform   # quicker

For every (layer profile, density) the three methods step in interleaved rounds (SGD, ML torch,
ML SparseProp, SGD, ...), so a change of machine load hits all three alike; the reported step
times are medians (min in the detail lines). Each ML LinBreg run sees: a fine step, then
1 + `warmup` + `steps` coarse steps, a second fine step and one more coarse step (whose swap cost is
the rebuild after a fine step with the per-layer decisions cached). The first coarse step is
never timed: in the SparseProp run it pays the one-time timed per-layer comparison (reported
separately). Each model first runs one untimed forward/backward (allocator, oneDNN set-up).

Per-epoch estimate for ML LinBreg with period m (default 100), from the measured times:
    steps_per_epoch * ((m - 1) * coarse + fine + swap) / m
and for SGD steps_per_epoch * step (steps_per_epoch = ceil(train_size / batch), CIFAR-10: 391).
Inputs are random (the kernels' cost does not depend on the values).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

from mlbreg.backends import TorchBackend
from mlbreg.metrics import sparsity_summary
from mlbreg.methods import build_method
from mlbreg.models import create_model
from mlbreg.sparsity import sparse_init_


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed coarse steps per ML LinBreg run (and SGD steps)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed coarse steps before them (after the first coarse step, which is never timed)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.10, 0.05, 0.02])
    p.add_argument("--schemes", nargs="+", default=["uniform", "erk"], choices=["uniform", "er", "erk"])
    p.add_argument("--m", type=int, default=100, help="ML LinBreg period for the per-epoch estimate")
    p.add_argument("--train-size", type=int, default=50000, help="samples per epoch (CIFAR-10: 50000)")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of the per-layer comparison")
    p.add_argument("--no-sgd", action="store_true", help="skip the dense SGD baseline")
    p.add_argument("--layers", action="store_true", help="print the per-layer choices")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Runner:
    """One method on one model; `step()` runs a training step the way mlbreg.train does."""

    def __init__(self, label, method_name, density, scheme, args, backend):
        self.label = label
        torch.manual_seed(args.seed)
        self.model = create_model(args.model, 10, (3, 32, 32))
        sparse_init_(self.model, density=density, scheme=scheme, seed=args.seed)
        self.model.train()
        settings = dict(lr=0.1, momentum=0.9, lam=args.lam, reg="l1", delta=1.0, dampening=0.0,
                        weight_decay=5e-4 if method_name == "sgd" else 0.0, m=2 + args.warmup + args.steps)
        self.method = build_method(method_name, self.model, **settings)
        if backend == "sparseprop":
            from mlbreg.backends.sparseprop import SparsePropBackend
            self.backend = SparsePropBackend(self.model, batch_size=args.batch_size, in_shape=(3, 32, 32),
                                             optimizer=self.method.optimizer, repeats=args.repeats)
        else:
            self.backend = TorchBackend(self.model)
        self.log = []

    def warm(self, x, y):
        """One untimed forward/backward without a step (allocator, oneDNN primitives; input shapes)."""
        nn.functional.cross_entropy(self.model(x), y).backward()
        self.model.zero_grad(set_to_none=True)

    def step(self, x, y):
        kind = self.method.step_kind()
        t = [time.perf_counter()]
        self.backend.before_step(kind)
        t.append(time.perf_counter())
        out = self.model(x)
        loss = nn.functional.cross_entropy(out, y)
        t.append(time.perf_counter())
        self.method.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.backend.after_backward()
        t.append(time.perf_counter())
        self.method.step()
        t.append(time.perf_counter())
        self.backend.after_step(kind)
        t.append(time.perf_counter())
        row = dict(kind=kind, swap=(t[1] - t[0]) + (t[5] - t[4]), fwd=t[2] - t[1], bwd=t[3] - t[2], opt=t[4] - t[3])
        row["total"] = sum(row[k] for k in ("swap", "fwd", "bwd", "opt"))
        self.log.append(row)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{self.label}: non-finite loss")
        return row


def med(rows, key="total"):
    return statistics.median(r[key] for r in rows) if rows else float("nan")


def split(rows):
    return " ".join(f"{k} {med(rows, k):.2f}" for k in ("fwd", "bwd", "opt", "swap"))


def bench_config(scheme, density, args, out):
    # fine, first coarse (one-time per-layer choice), warmup + steps coarse, fine, coarse (cached rebuild)
    rounds = 1 + 1 + args.warmup + args.steps + 1 + 1
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [(torch.randn(args.batch_size, 3, 32, 32, generator=gen),
                torch.randint(0, 10, (args.batch_size,), generator=gen)) for _ in range(rounds)]
    runners = []
    if not args.no_sgd:
        runners.append(Runner("SGD (torch, dense)", "sgd", 1.0, scheme, args, "torch"))
    runners.append(Runner("ML LinBreg, torch layers", "mllinbreg", density, scheme, args, "torch"))
    runners.append(Runner("ML LinBreg, SparseProp", "mllinbreg", density, scheme, args, "sparseprop"))
    for r in runners:
        r.warm(*batches[0])
    for x, y in batches:
        for r in runners:
            r.step(x, y)
    sparse_runner = runners[-1]
    be = sparse_runner.backend
    res = {}
    first_coarse, timed = 1, slice(2 + args.warmup, 2 + args.warmup + args.steps)
    fine_idx, after_fine = [0, 2 + args.warmup + args.steps], 3 + args.warmup + args.steps
    for r in runners:
        log = r.log
        if r.method.name == "sgd":
            res[r.label] = dict(step=med(log[timed]), detail=split(log[timed]), min=min(x["total"] for x in log[timed]))
            continue
        assert [log[i]["kind"] for i in fine_idx] == ["full_grad"] * 2, [x["kind"] for x in log]
        coarse = log[timed]
        fine = [log[i] for i in fine_idx]
        swap = log[after_fine]["swap"]                 # rebuild after a fine step (decisions cached)
        res[r.label] = dict(coarse=med(coarse), fine=med(fine), swap=swap, detail=split(coarse),
                            min=min(x["total"] for x in coarse), first=log[first_coarse]["swap"])
    steps_per_epoch = math.ceil(args.train_size / args.batch_size)
    m = args.m
    for label, v in res.items():
        if "coarse" in v:
            v["step"] = ((m - 1) * v["coarse"] + v["fine"] + v["swap"]) / m
        v["epoch"] = steps_per_epoch * v["step"]
    swapped = be.swapped_layers()
    now = sparsity_summary(sparse_runner.model)
    print(f"\n=== {args.model}, {scheme}, density {density:.2f} (now {now['nonzeros'] / now['prunable_params']:.3f}), "
          f"batch {args.batch_size}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f} ===", file=out)
    print(f"  SparseProp layers: {len(swapped)}/{len(be.layers)} swapped; one-time per-layer timing "
          f"{be.timing_seconds:.1f} s (first coarse step's swap {res['ML LinBreg, SparseProp']['first']:.1f} s)",
          file=out)
    dense_kept = [f"{row['layer']} ({row['why']})" for row in be.summary() if row["choice"] == "dense"]
    if dense_kept:
        print("  kept dense: " + "; ".join(dense_kept), file=out)
    if args.layers:
        for row in be.summary():
            t = " ".join(f"{k}={row[k]:.1f}" for k in ("dense_ms", "voo0_ms", "voo1_ms") if k in row)
            print(f"    {row['layer']:22s} density {row['density']:.3f} {row['choice']:17s} {t}", file=out)
    for label, v in res.items():
        if "coarse" in v:
            print(f"  {label:26s} coarse {v['coarse']:6.2f} s (min {v['min']:.2f}; {v['detail']})  fine {v['fine']:6.2f} s"
                  f"  swap {v['swap']:5.2f} s  -> step(m={m}) {v['step']:6.2f} s  epoch {v['epoch'] / 60:6.1f} min",
                  file=out)
        else:
            print(f"  {label:26s} step   {v['step']:6.2f} s (min {v['min']:.2f}; {v['detail']})"
                  f"{'':36s}epoch {v['epoch'] / 60:6.1f} min", file=out)
    # paired ratios: the steps of one round ran back to back (under the same machine load)
    logs = {r.label: r.log for r in runners}
    paired = {label: statistics.median(a["total"] / b["total"] for a, b in
                                       zip(logs[label][timed], logs["ML LinBreg, SparseProp"][timed]))
              for label in logs if label != "ML LinBreg, SparseProp"}
    sp, th = res["ML LinBreg, SparseProp"], res["ML LinBreg, torch layers"]
    sp["paired"] = paired
    ratios = f"  ratios per epoch: ML SparseProp vs ML torch {th['epoch'] / sp['epoch']:.2f}x"
    if "SGD (torch, dense)" in res:
        sgd = res["SGD (torch, dense)"]
        ratios += (f", ML SparseProp vs SGD {sgd['epoch'] / sp['epoch']:.2f}x, ML torch vs SGD "
                   f"{sgd['epoch'] / th['epoch']:.2f}x")
    ratios += (f"; coarse step SparseProp vs torch {th['coarse'] / sp['coarse']:.2f}x (median of the paired "
               f"per-round ratios {paired['ML LinBreg, torch layers']:.2f}x)")
    print(ratios, file=out)
    out.flush()
    return dict(scheme=scheme, density=density, **{k: v for k, v in res.items()})


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import mlbreg.backends.sparseprop  # noqa: F401
    except ImportError as err:
        sys.exit(f"SparseProp is not available: {err}")
    out = sys.stdout
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"bench_backends: {args.model}, batch {args.batch_size}, {args.warmup}+{args.steps} coarse steps per run, "
          f"m={args.m}, {math.ceil(args.train_size / args.batch_size)} steps/epoch; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({cpu}), load {os.getloadavg()[0]:.1f}", file=out)
    t0 = time.perf_counter()
    summary = []
    for scheme in args.schemes:
        for density in args.densities:
            summary.append(bench_config(scheme, density, args, out))
    print("\nSummary (per-epoch time, minutes; ratios = times faster):", file=out)
    head = (f"{'profile':8s} {'density':>7s} {'SGD':>7s} {'ML torch':>9s} {'ML SP':>7s} {'SP/torch':>9s} {'SP/SGD':>7s}"
            f" {'paired coarse SP/torch':>23s}")
    print(head, file=out)
    for s in summary:
        sp, th = s["ML LinBreg, SparseProp"], s["ML LinBreg, torch layers"]
        sgd = s.get("SGD (torch, dense)")
        sgd_min = f"{sgd['epoch'] / 60:7.1f}" if sgd else f"{'-':>7s}"
        vs_sgd = f"{sgd['epoch'] / sp['epoch']:6.2f}x" if sgd else f"{'-':>7s}"
        print(f"{s['scheme']:8s} {s['density']:7.2f} {sgd_min} {th['epoch'] / 60:9.1f} {sp['epoch'] / 60:7.1f} "
              f"{th['epoch'] / sp['epoch']:8.2f}x {vs_sgd} {sp['paired']['ML LinBreg, torch layers']:22.2f}x", file=out)
    print(f"(total benchmark time {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs; a load above the CPU count means other processes shared them)", file=out)


if __name__ == "__main__":
    main()
