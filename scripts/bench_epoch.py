"""Device loader throughput and epoch time of SGD vs ML LinBreg (torch layers), same run.

    python scripts/bench_epoch.py [--device cpu|cuda] [--train-size 2048] [--batch-size 128]

- loader: images/s of `mlbreg.data.BatchLoader` alone (uint8 on the device, random crop
  with padding 4 + flip + normalize), on a synthetic CIFAR-shaped set;
- epochs: the real training loop (`mlbreg.train.train`) on ResNet-18, 32x32 synthetic data,
  warm-up epochs (at least one, and past step 100) then timed epochs, for dense SGD and
  ML LinBreg (m = 100, l1; `compile_optimizer=false` etc. as extra arguments). The
  `epoch_s` column of metrics.csv is the measured time; the ratio ML LinBreg / SGD is the
  optimizer's overhead (goal ≤ 1.05x), and loader images/s over the model's images/s
  should be ≥ 10x.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import pandas as pd
import torch
from hydra import compose, initialize_config_dir

from mlbreg.data import BatchLoader, load_dataset
from mlbreg.hydra_glue import register_resolvers
from mlbreg.paths import config_dir
from mlbreg.train import train


def loader_images_per_s(device: torch.device, n: int, batch_size: int, repeats: int = 3) -> float:
    data = load_dataset("synthetic", train_size=n, test_size=8, augment=True)
    loader = BatchLoader(data.train, batch_size, data.mean, data.std, shuffle=True, augment=True, device=device)
    rates = []
    for epoch in range(repeats + 1):
        loader.set_epoch(epoch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _x, _y in loader:
            pass
        if device.type == "cuda":
            torch.cuda.synchronize()
        if epoch:  # the first pass warms up
            rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def warmup_epochs(args) -> int:
    """Untimed epochs: at least one, and enough for --warmup-steps (default 101: past ML
    LinBreg's second fine step at m = 100, so every variant of a compiled update is
    compiled before the timing; 1 suffices for the eager update)."""
    steps_per_epoch = -(-args.train_size // args.batch_size)
    return max(1, -(-args.warmup_steps // steps_per_epoch))


def epoch_seconds(method_overrides: list[str], args) -> float:
    warmup = warmup_epochs(args)
    overrides = [
        "dataset=synthetic",
        f"dataset.train_size={args.train_size}",
        "dataset.test_size=256",
        "model=resnet18",
        f"epochs={args.epochs + warmup}",
        f"batch_size={args.batch_size}",
        f"device={args.device}",
        "progress=false",
        "checkpoint_every=0",
        *method_overrides,
        *args.extra,
    ]
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, tmp)
        metrics = pd.read_csv(f"{tmp}/metrics.csv")
    return float(metrics.epoch_s.iloc[warmup:].median())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after the warm-up)")
    parser.add_argument("--loader-size", type=int, default=50000)
    parser.add_argument("--warmup-steps", type=int, default=101, help="untimed steps before the timed epochs")
    parser.add_argument("extra", nargs="*", help="more config overrides, e.g. precision=bf16 channels_last=true")
    args = parser.parse_args()
    register_resolvers()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# epoch benchmark, {name}, torch {torch.__version__}; overrides: {args.extra or 'none'}")
    loader_rate = loader_images_per_s(device, args.loader_size, args.batch_size)
    sgd = epoch_seconds(["method=sgd"], args)
    # backend=torch: the row is torch layers on every device (backend=auto takes the native kernels on a CPU)
    ml = epoch_seconds(["method=mllinbreg", "m=100", "lam=1.0", "backend=torch"], args)
    model_rate = args.train_size / sgd
    print("| measurement | value |\n|---|---|")
    print(f"| device loader alone | {loader_rate:,.0f} images/s |")
    print(f"| SGD epoch ({args.train_size} images, batch {args.batch_size}) | {sgd:.3f} s ({model_rate:,.0f} images/s) |")
    print(f"| ML LinBreg epoch (m=100, torch layers) | {ml:.3f} s |")
    print(f"| ML LinBreg / SGD epoch | {ml / sgd:.3f}x (goal <= 1.05x) |")
    print(f"| loader / model throughput | {loader_rate / model_rate:.1f}x (goal >= 10x) |")


if __name__ == "__main__":
    main()
