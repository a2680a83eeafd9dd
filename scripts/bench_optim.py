"""Optimizer step time: LinBreg and ML LinBreg (fine and coarse) vs torch.optim.SGD(foreach=True).

    python scripts/bench_optim.py [--models resnet18 wrn28_10] [--density 0.05] [--device cpu|cuda]

Same run, same parameters (the model's), same random gradients; median of --repeats
steps after warm-up (which includes the compilation of the `compiled=True` rows: their
update runs through torch.compile). Prints milliseconds per step and the ratio to SGD
(goal ≤ 1.3x, the memory-traffic ratio of the updates).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mlbreg.methods import split_param_groups
from mlbreg.models import create_model
from mlbreg.optim import LinBreg, MLLinBreg
from mlbreg.sparsity import sparse_init_


def timed(step, device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_model(name: str, density: float, device: torch.device, repeats: int, foreach) -> list[tuple[str, float]]:
    results = []

    def fresh():
        model = create_model(name, 10, (3, 32, 32))
        sparse_init_(model, density)
        model.to(device)
        g = torch.Generator(device=device).manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-3
        return model

    model = fresh()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    results.append(("SGD(foreach, momentum)", timed(sgd.step, device, repeats)))

    for compiled in (False, True):
        tag = ", compiled" if compiled else ""
        kw = dict(lr=0.1, lam=1.0, momentum=0.9, foreach=foreach, compiled=compiled)
        model = fresh()
        lb = LinBreg(split_param_groups(model, "l1", 1.0), **kw)
        results.append((f"LinBreg (l1){tag}", timed(lb.step, device, repeats)))

        model = fresh()
        # m = 1: every step is fine (a full LinBreg step + the support refresh)
        ml_fine = MLLinBreg(split_param_groups(model, "l1", 1.0), m=1, **kw)
        results.append((f"ML LinBreg fine step{tag}", timed(ml_fine.step, device, repeats)))

        model = fresh()
        ml = MLLinBreg(split_param_groups(model, "l1", 1.0), m=10**9, **kw)
        ml.step()  # the fine step that fixes the support; every later step is coarse
        results.append((f"ML LinBreg coarse step (density {density}){tag}", timed(ml.step, device, repeats)))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "wrn28_10"])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--foreach", choices=["auto", "on", "off"], default="auto")
    args = parser.parse_args()
    device = torch.device(args.device)
    foreach = {"auto": None, "on": True, "off": False}[args.foreach]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# optimizer step time, {name}, torch {torch.__version__}, median of {args.repeats}")
    for model in args.models:
        results = bench_model(model, args.density, device, args.repeats, foreach)
        base = results[0][1]
        print(f"\n{model} ({sum(p.numel() for p in create_model(model, 10, (3, 32, 32)).parameters()) / 1e6:.1f}M params)")
        print("| optimizer | ms/step | vs SGD |\n|---|---|---|")
        for label, ms in results:
            print(f"| {label} | {ms:.2f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
