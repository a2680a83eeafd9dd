#!/usr/bin/env python
"""Per-step and per-epoch training time on this CPU: the best dense training PyTorch gives (SGD in fp32
NCHW, fp32 channels_last and bf16 autocast + channels_last) against ML LinBreg on torch layers, on
SparseProp layers and on the native kernels (fp32, and precision=bf16), ResNet-18 on 32x32 inputs, in
one interleaved run.

    python scripts/bench_backends.py                      # batch 128, densities 0.10/0.05/0.02, uniform+ERK
    python scripts/bench_backends.py --batch-size 64 --steps 2 --densities 0.02 --schemes uniform   # quicker
    python scripts/bench_backends.py --no-sparseprop      # without SparseProp (not installed, or to save time)

For every (layer profile, density) the runners step in interleaved rounds (SGD fp32, SGD fp32 channels_last,
SGD bf16, ML torch, ML SparseProp, ML native, ML native bf16, SGD fp32, ...), so a change of machine load
hits all of them alike; the reported step times are medians (min in the detail lines). Each ML LinBreg run
sees: a fine step, then 1 + `warmup` + `steps` coarse steps, a second fine step and one more coarse step
(whose swap cost is the rebuild after a fine step with the per-layer decisions cached). The first coarse
step is never timed: it pays the one-time timed per-layer comparison (reported separately). Each model
first runs one untimed forward/backward (allocator, oneDNN set-up).

"Best dense" is the fastest of the three SGD runners' median step (the fastest way to train this model
densely on this machine; on a CPU with AMX, bf16 + channels_last). The ML LinBreg runners with
precision=bf16 run their fine steps as the dense bf16 runner does (autocast, channels_last); their coarse
steps run the sparse layers in fp32 (see mlbreg/backends/native/backend.py).

Per-epoch estimate for ML LinBreg with period m (default 100), from the measured times:
    steps_per_epoch * ((m - 1) * coarse + fine + swap) / m
and for SGD steps_per_epoch * step (steps_per_epoch = ceil(train_size / batch), CIFAR-10: 391).
Inputs are random (the kernels' cost does not depend on the values).

For the native backend it also prints the split of a coarse step (conv kernels, fused BatchNorm +
add + ReLU, layout copies into batch-innermost and padded planes, optimizer, and the rest: ReLUs outside
blocks, pooling, loss, autograd) and, per layer, the timed dense vs native forward + backward with the
useful GFLOP/s (2 * nnz * batch * output positions per product, times 3: forward, input gradient, weight
gradient). Like `mlbreg train` on a CPU, the process keeps freed memory (mlbreg.cpu_alloc), for every
runner alike; `--default-malloc` measures without it.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

from mlbreg.backends import TorchBackend
from mlbreg.backends.native import build as native_build
from mlbreg.backends.native import ops as native_ops
from mlbreg.cpu_alloc import keep_freed_memory
from mlbreg.methods import build_method
from mlbreg.metrics import sparsity_summary
from mlbreg.models import create_model
from mlbreg.sparsity import sparse_init_


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="resnet18", help="a registered model, torchvision.<name> or timm.<name> (e.g. torchvision.resnet50)"
    )
    p.add_argument("--input-size", type=int, default=32, help="H = W of the random 3-channel inputs (64: TinyImageNet)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed coarse steps per ML LinBreg run (and SGD steps)")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed coarse steps before them (after the first coarse step, which is never timed)",
    )
    p.add_argument("--densities", type=float, nargs="+", default=[0.10, 0.05, 0.02])
    p.add_argument("--schemes", nargs="+", default=["uniform", "erk"], choices=["uniform", "er", "erk"])
    p.add_argument("--m", type=int, default=100, help="ML LinBreg period for the per-epoch estimate")
    p.add_argument("--train-size", type=int, default=50000, help="samples per epoch (CIFAR-10: 50000)")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of the per-layer comparison")
    p.add_argument("--no-sgd", action="store_true", help="skip the dense SGD baselines")
    p.add_argument(
        "--no-bf16",
        action="store_true",
        help="skip the bf16 runners (dense SGD bf16, ML LinBreg native bf16): on a CPU without bf16 "
        "hardware they are emulated and slow",
    )
    p.add_argument("--no-sparseprop", action="store_true", help="skip the SparseProp backend")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator settings alone")
    p.add_argument("--layers", action="store_true", help="print the per-layer choices")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Runner:
    """One method on one model; `step()` runs a training step the way mlbreg.train does."""

    def __init__(self, label, method_name, density, scheme, args, backend, precision="fp32", channels_last=False):
        self.label = label
        self.precision, self.channels_last = precision, channels_last
        torch.manual_seed(args.seed)
        shape = (3, args.input_size, args.input_size)
        self.model = create_model(args.model, 10, shape)
        sparse_init_(self.model, density=density, scheme=scheme, seed=args.seed)
        self.model.train()
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        settings = dict(lr=0.1, momentum=0.9, weight_decay=5e-4 if method_name == "sgd" else 0.0, dampening=0.0)
        if method_name != "sgd":
            settings.update(lam=args.lam, reg="l1", delta=1.0, m=2 + args.warmup + args.steps)
        self.method = build_method(method_name, self.model, **settings)
        if backend == "sparseprop":
            from mlbreg.backends.sparseprop import SparsePropBackend

            self.backend = SparsePropBackend(
                self.model, batch_size=args.batch_size, in_shape=shape, optimizer=self.method.optimizer, repeats=args.repeats
            )
        elif backend == "native":
            from mlbreg.backends.native.backend import NativeBackend

            self.backend = NativeBackend(
                self.model,
                batch_size=args.batch_size,
                in_shape=shape,
                optimizer=self.method.optimizer,
                repeats=args.repeats,
                precision=precision,
                channels_last=channels_last,
            )
        else:
            self.backend = TorchBackend(self.model)
        self.log = []

    def _input(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def warm(self, x, y):
        """One untimed forward/backward without a step (allocator, oneDNN primitives; input shapes)."""
        with self._autocast():
            loss = nn.functional.cross_entropy(self.model(self._input(x)).float(), y)
        loss.backward()
        self.model.zero_grad(set_to_none=True)

    def step(self, x, y):
        kind = self.method.step_kind()
        native = self.backend.name == "native"
        native_ops.OpTimes.enabled = native
        native_ops.OpTimes.reset()
        t = [time.perf_counter()]
        self.backend.before_step(kind)
        x = self._input(x)
        t.append(time.perf_counter())
        with self._autocast():
            out = self.model(x)
            loss = nn.functional.cross_entropy(out.float(), y)
        t.append(time.perf_counter())
        self.method.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.backend.after_backward()
        t.append(time.perf_counter())
        self.method.step()
        t.append(time.perf_counter())
        self.backend.after_step(kind)
        t.append(time.perf_counter())
        row = dict(
            kind=kind,
            swap_s=(t[1] - t[0]) + (t[5] - t[4]),
            forward_s=t[2] - t[1],
            backward_s=t[3] - t[2],
            optimizer_s=t[4] - t[3],
        )
        row["total"] = sum(row[k] for k in ("swap_s", "forward_s", "backward_s", "optimizer_s"))
        native_ops.OpTimes.enabled = False
        if native:
            row.update({f"op_{k}": v for k, v in native_ops.OpTimes.seconds.items()})
        self.log.append(row)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{self.label}: non-finite loss")
        return row


def med(rows, key="total"):
    return statistics.median(r[key] for r in rows) if rows else float("nan")


TIMERS = {"forward_s": "fwd", "backward_s": "bwd", "optimizer_s": "opt", "swap_s": "swap"}  # metrics.csv name -> label


def split(rows):
    """Medians of the timers, short labels: 'fwd 0.12 bwd 0.30 opt 0.01 swap 0.00'."""
    return " ".join(f"{label} {med(rows, k):.2f}" for k, label in TIMERS.items())


SGD32, SGD32CL, SGD16 = "SGD fp32", "SGD fp32 channels_last", "SGD bf16 channels_last"
TORCH, SPARSEPROP, NATIVE, NATIVE16 = (
    "ML LinBreg, torch layers",
    "ML LinBreg, SparseProp",
    "ML LinBreg, native",
    "ML LinBreg, native bf16",
)
SHORT = {
    SGD32: "SGD fp32",
    SGD32CL: "SGD fp32 CL",
    SGD16: "SGD bf16 CL",
    TORCH: "ML torch",
    SPARSEPROP: "ML SpProp",
    NATIVE: "ML native",
    NATIVE16: "ML nat bf16",
}
DENSE = (SGD32, SGD32CL, SGD16)


def runner_specs(args):
    """(label, method, backend, precision, channels_last) of the runners this invocation compares."""
    specs = []
    if not args.no_sgd:
        specs += [(SGD32, "sgd", "torch", "fp32", False), (SGD32CL, "sgd", "torch", "fp32", True)]
        if not args.no_bf16:
            specs.append((SGD16, "sgd", "torch", "bf16", True))
    specs.append((TORCH, "mllinbreg", "torch", "fp32", False))
    if not args.no_sparseprop:
        specs.append((SPARSEPROP, "mllinbreg", "sparseprop", "fp32", False))
    specs.append((NATIVE, "mllinbreg", "native", "fp32", False))
    if not args.no_bf16:
        specs.append((NATIVE16, "mllinbreg", "native", "bf16", True))
    return specs


def best_dense(res, labels=DENSE):
    """(label, step seconds) of the fastest dense runner among `labels` in this configuration."""
    steps = [(res[label]["step"], label) for label in labels if label in res]
    return (min(steps)[1], min(steps)[0]) if steps else (None, float("nan"))


def layer_gflops(row, batch):
    """Useful GFLOP/s of a layer's timed native forward + backward."""
    if not row.get("native_ms") or row["in_shape"] is None:
        return float("nan")
    if row["kind"] == "conv":
        mod = row["module"]
        _, h, w = row["in_shape"]
        k, s, p = mod.kernel_size[0], mod.stride[0], mod.padding[0]
        positions = ((h + 2 * p - k) // s + 1) * ((w + 2 * p - k) // s + 1)
    else:
        positions = 1
    return 3 * 2 * row["nnz"] * batch * positions / (row["native_ms"] * 1e-3) / 1e9


def print_layers(title, be, args, out):
    modules = dict(be.model.named_modules())
    print(f"  {title} per layer (timed forward + backward at batch {args.batch_size}):", file=out)
    for row in be.summary():
        times = " ".join(f"{k}={row[k]:.1f}" for k in ("dense_ms", "native_ms", "voo0_ms", "voo1_ms") if k in row)
        extra = ""
        if "native_ms" in row:
            row["module"] = modules[row["layer"]]
            extra = f" useful {layer_gflops(row, args.batch_size):5.1f} GFLOP/s"
        print(f"    {row['layer']:22s} density {row['density']:.3f} {row['choice']:17s} {times}{extra}", file=out)


def bench_config(scheme, density, args, out):
    # fine, first coarse (one-time per-layer choice), warmup + steps coarse, fine, coarse (cached rebuild)
    rounds = 1 + 1 + args.warmup + args.steps + 1 + 1
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [
        (
            torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=gen),
            torch.randint(0, 10, (args.batch_size,), generator=gen),
        )
        for _ in range(rounds)
    ]
    runners = [
        Runner(label, method, 1.0 if method == "sgd" else density, scheme, args, backend, precision, cl)
        for label, method, backend, precision, cl in runner_specs(args)
    ]
    for r in runners:
        r.warm(*batches[0])
    for x, y in batches:
        for r in runners:
            r.step(x, y)
    by_label = {r.label: r for r in runners}
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
        swap = log[after_fine]["swap_s"]  # rebuild after a fine step (decisions cached)
        res[r.label] = dict(
            coarse=med(coarse),
            fine=med(fine),
            swap=swap,
            detail=split(coarse),
            min=min(x["total"] for x in coarse),
            first=log[first_coarse]["swap_s"],
        )
    steps_per_epoch = math.ceil(args.train_size / args.batch_size)
    m = args.m
    for v in res.values():
        if "coarse" in v:
            v["step"] = ((m - 1) * v["coarse"] + v["fine"] + v["swap"]) / m
        v["epoch"] = steps_per_epoch * v["step"]
    native = by_label[NATIVE]
    now = sparsity_summary(native.model)
    print(
        f"\n=== {args.model}, {scheme}, density {density:.2f} (now {now['nonzeros'] / now['prunable_params']:.3f}), "
        f"batch {args.batch_size}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f} ===",
        file=out,
    )
    for label in (SPARSEPROP, NATIVE, NATIVE16):
        if label not in by_label:
            continue
        be = by_label[label].backend
        fused = f", {len(be.fusions)} fused conv -> BN -> [add] -> ReLU chains" if hasattr(be, "fusions") else ""
        print(
            f"  {label.split(', ')[1]} layers: {len(be.swapped_layers())}/{len(be.layers)} swapped{fused}; one-time "
            f"per-layer timing {be.timing_seconds:.1f} s (first coarse step's swap {res[label]['first']:.1f} s)",
            file=out,
        )
        kept = [f"{row['layer']} ({row['why']})" for row in be.summary() if row["choice"] == "dense"]
        if kept:
            print("    kept dense: " + "; ".join(kept), file=out)
        if args.layers or label in (NATIVE, NATIVE16):
            print_layers(label.split(", ")[1], be, args, out)
    for label, v in res.items():
        if "coarse" in v:
            print(
                f"  {label:26s} coarse {v['coarse']:6.3f} s (min {v['min']:.3f}; {v['detail']})  fine {v['fine']:6.3f} s"
                f"  swap {v['swap']:5.3f} s  -> step(m={m}) {v['step']:6.3f} s  epoch {v['epoch'] / 60:6.2f} min",
                file=out,
            )
        else:
            print(
                f"  {label:26s} step   {v['step']:6.3f} s (min {v['min']:.3f}; {v['detail']})"
                f"{'':40s}epoch {v['epoch'] / 60:6.2f} min",
                file=out,
            )
    # the native coarse steps, split by kind of work (medians over the timed steps)
    for label in (NATIVE, NATIVE16):
        if label not in by_label:
            continue
        coarse_native = by_label[label].log[timed]
        parts = {
            k: med(coarse_native, f"op_{k}") if all(f"op_{k}" in r for r in coarse_native) else 0.0
            for k in ("conv", "bn", "layout")
        }
        parts["optimizer"] = med(coarse_native, "optimizer_s")
        parts["rest"] = res[label]["coarse"] - sum(parts.values())
        print(
            f"  {label.split(', ')[1]} coarse step split: "
            + ", ".join(
                f"{name} {v:.3f} s"
                for name, v in zip(
                    (
                        "conv kernels",
                        "BN+add+ReLU",
                        "layout + padding copies",
                        "optimizer",
                        "rest (dense layers/ReLU/pool/loss/autograd/swap)",
                    ),
                    parts.values(),
                )
            ),
            file=out,
        )
    # against the best dense training on this machine: at matched precision and at the best one
    best, best_step = best_dense(res)
    best32, best32_step = best_dense(res, (SGD32, SGD32CL))
    if best is not None:
        lines = []
        for label, ref, ref_step in ((NATIVE, best, best_step), (NATIVE, best32, best32_step), (NATIVE16, best, best_step)):
            if label in res and ref is not None:
                v = res[label]
                lines.append(
                    f"{SHORT[label]} vs {SHORT[ref]}: coarse step {ref_step / v['coarse']:.2f}x, "
                    f"epoch {res[ref]['epoch'] / v['epoch']:.2f}x"
                )
        print(f"  best dense step: {best} {best_step:.3f} s (best fp32: {best32} {best32_step:.3f} s)", file=out)
        print("  times faster: " + "; ".join(lines), file=out)
    # paired ratios: the steps of one round ran back to back (under the same machine load)
    logs = {r.label: r.log for r in runners}
    paired = {
        label: statistics.median(a["total"] / b["total"] for a, b in zip(logs[label][timed], logs[NATIVE][timed]))
        for label in logs
        if label != NATIVE
    }
    line = "  ratios (times faster), native vs: "
    line += ", ".join(
        f"{SHORT[label]} {res[label].get('coarse', res[label]['step']) / res[NATIVE]['coarse']:.2f}x "
        f"(paired {paired[label]:.2f}x)"
        for label in res
        if label != NATIVE
    )
    print(line, file=out)
    out.flush()
    return dict(scheme=scheme, density=density, **{k: v for k, v in res.items()})


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "glibc default" if args.default_malloc else ("freed memory kept" if keep_freed_memory() else "default")
    try:
        ext = native_build.load()
    except native_build.NativeUnavailable as err:
        sys.exit(f"the native kernels are not available: {err}")
    if not args.no_sparseprop:
        try:
            import sparseprop  # noqa: F401

            import mlbreg.backends.sparseprop  # noqa: F401
        except ImportError as err:
            print(f"SparseProp is not available ({err}); running without it", file=sys.stderr)
            args.no_sparseprop = True
    out = sys.stdout
    print(
        f"bench_backends: {args.model}, {args.input_size}x{args.input_size} inputs, batch {args.batch_size}, "
        f"{args.warmup}+{args.steps} coarse steps per run, "
        f"m={args.m}, {math.ceil(args.train_size / args.batch_size)} steps/epoch; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({native_build.cpu_model()}; "
        f"{native_build.cpu_features() or 'features unknown'}), native kernels: {ext.simd_path()} path, "
        f"allocator: {malloc}, {time.strftime('%Y-%m-%d')}, load {os.getloadavg()[0]:.1f}",
        file=out,
    )
    t0 = time.perf_counter()
    summary = []
    for scheme in args.schemes:
        for density in args.densities:
            summary.append(bench_config(scheme, density, args, out))
    print(
        "\nSummary: SGD step / ML LinBreg coarse step (s); ratios = times faster than the best dense step "
        "(same run, interleaved):",
        file=out,
    )
    labels = [label for label, *_ in runner_specs(args)]
    head = (
        f"{'profile':8s} {'density':>7s} "
        + " ".join(f"{SHORT[lb]:>11s}" for lb in labels)
        + "  best dense           native/best  native/best-fp32  native-bf16/best  native/best epoch"
    )
    print(head, file=out)
    for s in summary:
        cells = " ".join(f"{s[lb].get('coarse', s[lb]['step']):11.3f}" if lb in s else f"{'-':>11s}" for lb in labels)
        best, best_step = best_dense(s)
        _, best32_step = best_dense(s, (SGD32, SGD32CL))
        nv = s[NATIVE]
        r16 = f"{best_step / s[NATIVE16]['coarse']:16.2f}x" if NATIVE16 in s else f"{'-':>17s}"
        ep = f"{s[best]['epoch'] / nv['epoch']:17.2f}x" if best else f"{'-':>18s}"
        print(
            f"{s['scheme']:8s} {s['density']:7.2f} {cells}  {SHORT.get(best, '-'):12s} {best_step:7.3f}"
            f" {best_step / nv['coarse']:11.2f}x {best32_step / nv['coarse']:16.2f}x {r16} {ep}",
            file=out,
        )
    print(
        f"(total benchmark time {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs; a load above the CPU count means other processes shared them)",
        file=out,
    )


if __name__ == "__main__":
    main()
