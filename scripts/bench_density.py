#!/usr/bin/env python
"""Density sweep of single layers: the native sparse conv (forward + input gradient + weight gradient)
against the best dense conv on this CPU, one layer of each ResNet-18 (CIFAR) shape; where sparse pays.

    python scripts/bench_density.py                                   # batch 128, densities 0.01 .. 0.3
    python scripts/bench_density.py --plot density.png                # and the plot
    python scripts/bench_density.py --batch-size 32 --densities 0.02 0.1 --repeats 3   # quicker

Dense baselines (their cost does not depend on the density; timed once per layer, in the same interleaved
rounds): fp32 NCHW, fp32 channels_last and bf16 autocast + channels_last, forward + backward (input and
weight gradient). The sparse candidate is the native kernels' autograd function on batch-innermost (CHWB)
activations with a uniform random mask, as the native backend runs it inside a coarse step (its padding
copies included): fp32 activations, or with `--bf16` bf16 activations (precision=bf16). Times are medians
of `--repeats` interleaved rounds after a warm-up call.

Printed per layer and density: the native time and its useful GFLOP/s (3 * 2 * nnz * batch * output
positions), and how many times faster it is than the best dense conv and than the best fp32 dense conv;
then per layer the break-even density (log-linear interpolation between the measured densities) below
which the sparse conv beats each baseline.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
from torch.nn import functional as F

from mlbreg.backends.native import build as native_build
from mlbreg.backends.native import ops
from mlbreg.cpu_alloc import keep_freed_memory

# (label, c_in, c_out, kernel, stride, padding, input size): one layer of each ResNet-18 (CIFAR) shape
LAYERS = [
    ("stem 3->64 3x3 32x32", 3, 64, 3, 1, 1, 32),
    ("64->64 3x3 32x32", 64, 64, 3, 1, 1, 32),
    ("64->128 3x3 s2 32x32", 64, 128, 3, 2, 1, 32),
    ("64->128 1x1 s2 32x32", 64, 128, 1, 2, 0, 32),
    ("128->128 3x3 16x16", 128, 128, 3, 1, 1, 16),
    ("256->256 3x3 8x8", 256, 256, 3, 1, 1, 8),
    ("512->512 3x3 4x4", 512, 512, 3, 1, 1, 4),
]
DENSE = ("fp32", "fp32 CL", "bf16 CL")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.3])
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds (medians)")
    p.add_argument(
        "--layers", nargs="+", type=int, default=None, help=f"indices into the layer list (default: all {len(LAYERS)})"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 baseline (emulated on CPUs without bf16)")
    p.add_argument("--bf16", action="store_true", help="the sparse conv with bf16 activations (precision=bf16)")
    p.add_argument("--plot", default=None, help="write the speed-up vs density plot to this file (PNG)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for d in args.densities:
        if not 0 < d <= 1:
            p.error(f"density {d} is not in (0, 1]")
    for i in args.layers or []:
        if not 0 <= i < len(LAYERS):
            p.error(f"layer index {i} is not in 0..{len(LAYERS) - 1}")
    return args


def dense_candidates(c_in, c_out, k, s, p, h, batch, gen, bf16: bool):
    """name -> callable running one dense forward + backward."""
    out = {}
    x = torch.randn(batch, c_in, h, h, generator=gen)
    w = torch.randn(c_out, c_in, k, k, generator=gen)
    ho = (h + 2 * p - k) // s + 1
    g = torch.randn(batch, c_out, ho, ho, generator=gen)
    for name in DENSE:
        if name == "bf16 CL" and not bf16:
            continue
        cl = "CL" in name
        xi = (x.contiguous(memory_format=torch.channels_last) if cl else x.clone()).requires_grad_(True)
        wi = (w.contiguous(memory_format=torch.channels_last) if cl else w.clone()).requires_grad_(True)
        gi = g.contiguous(memory_format=torch.channels_last) if cl else g
        lowp = name.startswith("bf16")

        def run(xi=xi, wi=wi, gi=gi, lowp=lowp):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=lowp):
                y = F.conv2d(xi, wi, stride=s, padding=p)
            y.backward(gi.to(y.dtype))
            xi.grad = wi.grad = None

        out[name] = run
    return out


def sparse_candidate(ext, c_in, c_out, k, s, p, h, batch, density, gen, bf16=False):
    """(callable running one native forward + backward, nnz, useful GFLOP per call)."""
    act = torch.bfloat16 if bf16 else torch.float32
    mask = torch.rand(c_out, c_in, k, k, generator=gen) < density
    w = torch.randn(c_out, c_in, k, k, generator=gen) * mask
    st = ops.build_structure(ext, mask, s, p)
    w_val = w.reshape(-1)[st.idx].clone().requires_grad_(True)
    x = ops.from_chwb(torch.randn(c_in, h, h, batch, generator=gen).to(act)).requires_grad_(True)
    ho = (h + 2 * p - k) // s + 1
    g = ops.from_chwb(torch.randn(c_out, ho, ho, batch, generator=gen).to(act))

    def run():
        ops.sparse_conv2d(x, w_val, st, bf16).backward(g)
        x.grad = w_val.grad = None

    return run, st.nnz, 3 * 2 * st.nnz * batch * ho * ho / 1e9


def time_rounds(candidates: dict, repeats: int) -> dict:
    """Medians (seconds) of interleaved rounds after one warm-up call each."""
    for fn in candidates.values():
        fn()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def break_even(densities, ratios) -> str:
    """The density where the speed-up crosses 1 (log-linear between measured points), as text."""
    pts = sorted(zip(densities, ratios))
    if all(r >= 1 for _, r in pts):
        return f">= {pts[-1][0]:g} (sparse faster at every density measured)"
    if all(r < 1 for _, r in pts):
        return f"< {pts[0][0]:g} (dense faster at every density measured)"
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if r0 >= 1 > r1:
            t = math.log(r0) / (math.log(r0) - math.log(r1))
            return f"{math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0))):.3f}"
    return "not monotone: see the table"


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, name in ((axes[0], "vs_best", "best dense"), (axes[1], "vs_fp32", "best fp32 dense")):
        for label, rows in results.items():
            ax.plot([r["density"] for r in rows], [r[key] for r in rows], marker="o", label=label)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (fraction of non-zero weights)")
        ax.set_title(f"native sparse vs {name}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("times faster (forward + backward)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    try:
        ext = native_build.load()
    except native_build.NativeUnavailable as err:
        sys.exit(f"the native kernels are not available: {err}")
    head = (
        f"bench_density: batch {args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{native_build.cpu_model()} ({native_build.cpu_features() or 'features unknown'}), native kernels: "
        f"{ext.simd_path()} path, sparse activations {'bf16' if args.bf16 else 'fp32'}, {time.strftime('%Y-%m-%d')}, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    print(head)
    gen = torch.Generator().manual_seed(args.seed)
    layers = [LAYERS[i] for i in args.layers] if args.layers else LAYERS
    results = {}
    for label, c_in, c_out, k, s, p, h in layers:
        cands = dense_candidates(c_in, c_out, k, s, p, h, args.batch_size, gen, not args.no_bf16)
        sparse = {}
        for d in args.densities:
            run, nnz, gflop = sparse_candidate(ext, c_in, c_out, k, s, p, h, args.batch_size, d, gen, args.bf16)
            cands[f"sparse {d:g}"] = run
            sparse[d] = (nnz, gflop)
        med = time_rounds(cands, args.repeats)
        dense = {name: med[name] for name in DENSE if name in med}
        best = min(dense, key=dense.get)
        best32 = min((n for n in dense if n.startswith("fp32")), key=dense.get)
        print(f"\n{label}: dense " + ", ".join(f"{n} {1e3 * t:.2f} ms" for n, t in dense.items()) + f"; best {best}")
        rows = []
        for d, (nnz, gflop) in sparse.items():
            t = med[f"sparse {d:g}"]
            row = dict(density=d, ms=1e3 * t, gflops=gflop / t, vs_best=dense[best] / t, vs_fp32=dense[best32] / t)
            rows.append(row)
            print(
                f"  density {d:5.3f} nnz {nnz:8d}: native {row['ms']:8.2f} ms  useful {row['gflops']:6.1f} GFLOP/s"
                f"  vs best dense {row['vs_best']:6.2f}x  vs best fp32 {row['vs_fp32']:6.2f}x"
            )
        print(
            f"  break-even density: vs best dense {break_even(args.densities, [r['vs_best'] for r in rows])}; "
            f"vs best fp32 {break_even(args.densities, [r['vs_fp32'] for r in rows])}"
        )
        results[label] = rows
    if args.plot:
        plot(results, args.plot, head)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
