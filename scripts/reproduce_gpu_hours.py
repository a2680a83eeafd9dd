"""How many GPU-hours each paper preset takes on this machine: measured, not guessed.

    python scripts/reproduce_gpu_hours.py [--presets table1_resnet18 ...] [--out gpu_hours.md]
                                          [--train-size 4096] [--device cuda] [OVERRIDE ...]

Each preset is expanded into its runs exactly as `mlbreg train -m +experiment=NAME` would
(`mlbreg.hydra_glue.sweep_jobs`). For every distinct (dataset shape, model, method, backend) one
short training of that very config runs on synthetic images of the dataset's shape and class
count (`--train-size` images, 3 epochs, the first one a warm-up, no files kept), through the
real loop (`mlbreg.train.train`). Its seconds per training image and per evaluated image,
times the real dataset's size and the run's epochs, give the hours of one run; summed over
the preset's runs, the preset's GPU-hours. prune_finetune is timed as its config (its short
timing run prunes after the first timed epoch), RigL with its mask updates.

OVERRIDEs apply to every run (e.g. precision=bf16 channels_last=true to time a faster setup).
The CPU preset cpu_timing is skipped on a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf, open_dict

from mlbreg.data import DATASETS
from mlbreg.hydra_glue import preset_override, sweep_jobs
from mlbreg.paths import config_dir
from mlbreg.report.tables import to_markdown

PRESETS = [
    "table1_resnet18",
    "table1_vgg16",
    "table1_wrn28_10",
    "table2_mask_init",
    "ablation_lambda",
    "ablation_m",
    "tinyimagenet",
    "cpu_timing",
]
TEST_IMAGES = 1024  # synthetic test images per timed evaluation


def time_config(cfg, train_size: int, device: str) -> dict[str, float]:
    """Seconds per training image and per test image of `cfg`, on synthetic data of its shape."""
    from mlbreg.train import train

    source = DATASETS.get(cfg.dataset.name)
    shape, classes = list(source.in_shape), source.num_classes
    cfg = cfg.copy()
    with open_dict(cfg):
        # the synthetic group option (so the config check knows every key), shaped like the real set
        cfg.dataset = OmegaConf.merge(
            OmegaConf.load(Path(config_dir()) / "dataset" / "synthetic.yaml"),
            dict(shape=shape, num_classes=classes, train_size=train_size, test_size=TEST_IMAGES, augment=True),
        )
        cfg.epochs, cfg.device, cfg.progress, cfg.checkpoint_every, cfg.resume = 3, device, False, 0, False
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        outcome = train(cfg, tmp)
        wall = time.perf_counter() - start
        metrics = pd.read_csv(Path(tmp) / "metrics.csv")
    if outcome["status"] != "finished":
        raise RuntimeError(f"timing run {outcome['status']}: {outcome.get('message', '')}")
    timed = metrics[metrics["epoch"] > 1]  # epoch 1 warms up (cuDNN autotuning, allocations)
    return dict(
        train_s_per_image=timed["epoch_s"].mean() / train_size,
        eval_s_per_image=timed["eval_s"].mean() / TEST_IMAGES,
        timing_wall_s=wall,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--train-size", type=int, default=4096, help="synthetic images per timed epoch")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="gpu_hours.md", help="Markdown table; a .csv beside it")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    timings: dict[tuple, dict[str, float]] = {}
    rows, per_run = [], []
    for preset in args.presets:
        jobs = sweep_jobs([preset_override(preset), *args.overrides])
        if any(cfg.device == "cpu" for _, cfg in jobs) and args.device != "cpu":
            print(f"{preset}: a CPU preset, skipped on {args.device}", flush=True)
            continue
        hours = 0.0
        for _job, cfg in jobs:
            key = (
                cfg.dataset.name,
                cfg.model.name,
                cfg.method.name,
                cfg.backend,
                cfg.batch_size,
                OmegaConf.select(cfg, "precision"),
                OmegaConf.select(cfg, "channels_last"),
            )
            new = key not in timings
            if new:
                timings[key] = time_config(cfg, args.train_size, args.device)
            t = timings[key]
            n_train, n_test = DATASETS.get(cfg.dataset.name).sizes
            run_h = cfg.epochs * (n_train * t["train_s_per_image"] + n_test * t["eval_s_per_image"]) / 3600
            hours += run_h
            if new:
                print(
                    f"timed {'/'.join(map(str, key[:3]))}: {1 / t['train_s_per_image']:.0f} train images/s "
                    f"({t['timing_wall_s']:.0f} s)",
                    flush=True,
                )
                per_run.append(
                    dict(
                        dataset=key[0],
                        model=key[1],
                        method=key[2],
                        backend=key[3],
                        train_images_per_s=round(1 / t["train_s_per_image"]),
                        hours_per_200_epoch_run=round(run_h * 200 / cfg.epochs, 2),
                    )
                )
        rows.append(dict(preset=preset, runs=len(jobs), gpu_hours=round(hours, 1)))
        print(f"{preset}: {len(jobs)} runs, {hours:.1f} GPU-hours", flush=True)

    import torch

    device = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else args.device
    presets, runs = pd.DataFrame(rows), pd.DataFrame(per_run)
    text = (
        f"Measured on {device} ({' '.join(args.overrides) or 'preset settings'}).\n\n"
        f"{to_markdown(presets)}\nOne run of 200 epochs:\n\n{to_markdown(runs)}"
    )
    out = Path(args.out)
    out.write_text(text)
    presets.to_csv(out.with_suffix(".csv"), index=False)
    runs.to_csv(out.with_name(out.stem + "_per_run.csv"), index=False)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
