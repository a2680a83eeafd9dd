"""The persistent contract of a run directory: its name and its files' columns.

A run's directory name is how a relaunched command finds it (to skip or resume it), and
how `mlbreg report --sweep` matches runs; the CSV columns are what `mlbreg report` and
users' own scripts read. Both were pinned here from the code before the issue-13 refactor
and must never change by accident: a changed name orphans every run of every sweep made
so far. A deliberate change needs a migration (see `mlbreg.config.LATER_KEYS`) and a new
expected value here.
"""

import csv
import json

import pytest
import torch

from mlbreg.config import run_name
from mlbreg.train import train

from helpers import make_cfg

# overrides -> the run name mlbreg has always given them
NAMES = {
    ("method=mllinbreg",): "digits/mlp/mllinbreg/l1-lam0.03_m100_uniform0.01_seed0_dd45b015",
    (
        "method=mllinbreg",
        "lam=0.5",
        "m=50",
        "init=erk",
        "init.density=0.05",
        "seed=3",
    ): "digits/mlp/mllinbreg/l1-lam0.5_m50_erk0.05_seed3_b8467912",
    (
        "method=mllinbreg",
        "regularizer=group",
        "method.criterion=adaptive",
    ): "digits/mlp/mllinbreg/group-lam0.03_m100_uniform0.01_seed0_165675ea",
    ("method=linbreg",): "digits/mlp/linbreg/l1-lam0.03_uniform0.01_seed0_0498a264",
    ("method=linbreg", "lam=0.1", "regularizer=l1"): "digits/mlp/linbreg/l1-lam0.1_uniform0.01_seed0_b5142f01",
    ("method=sgd",): "digits/mlp/sgd/seed0_f57fe735",
    ("method=sgd", "lam=2", "sparsity=0.9"): "digits/mlp/sgd/seed0_007c2299",
    # RigL's defaults became the reference's: new names at the new defaults, the old
    # names for the old behaviour (LATER_KEYS)
    ("method=rigl", "sparsity=0.9"): "digits/mlp/rigl/sp0.9_uniform_seed0_fcc487d0",
    (
        "method=rigl",
        "sparsity=0.9",
        "method.reinit_when_same=true",
        "method.count=round",
        "method.drop_noise_std=0",
    ): "digits/mlp/rigl/sp0.9_uniform_seed0_c3f76560",
    ("method=rigl", "sparsity=0.95", "init=erk", "seed=1"): "digits/mlp/rigl/sp0.95_erk_seed1_ca238e5e",
    ("method=prune_finetune", "sparsity=0.9"): "digits/mlp/prune_finetune/sp0.9_seed0_17259b18",
    (
        "method=prune_finetune",
        "sparsity=0.98",
        "method.finetune_epochs=20",
        "epochs=200",
    ): "digits/mlp/prune_finetune/sp0.98_seed0_f6c89cfa",
    # the baselines SET, static sparse and gradual magnitude pruning, pinned when they were added
    ("method=set", "sparsity=0.9"): "digits/mlp/set/sp0.9_uniform_seed0_7e6de165",
    ("method=set", "sparsity=0.95", "init=erk", "seed=1"): "digits/mlp/set/sp0.95_erk_seed1_5d1fe378",
    ("method=static", "sparsity=0.9"): "digits/mlp/static/sp0.9_uniform_seed0_a1435d8e",
    ("method=static", "sparsity=0.95", "init=erk"): "digits/mlp/static/sp0.95_erk_seed0_c6ceadeb",
    ("method=gmp", "sparsity=0.9"): "digits/mlp/gmp/sp0.9_uniform_seed0_7dce99e2",
    ("method=gmp", "sparsity=0.95", "method.scope=global"): "digits/mlp/gmp/sp0.95_global_seed0_7cf6fc64",
    ("method=gmp", "sparsity=0.98", "init=erk", "method.frequency=10"): "digits/mlp/gmp/sp0.98_erk_seed0_d25d143f",
    (
        "dataset=cifar10",
        "model=resnet18",
        "lam=1.0",
        "m=100",
    ): "cifar10/resnet18/mllinbreg/l1-lam1_m100_uniform0.01_seed0_6e1f38dc",
    (
        "dataset=tinyimagenet",
        "model=resnet18",
        "method=rigl",
        "sparsity=0.9",
        "init=erk",
    ): "tinyimagenet/resnet18/rigl/sp0.9_erk_seed0_dd081005",
    # an architecture by name from torchvision (models/external.py)
    ("model=torchvision.resnet18",): "digits/torchvision.resnet18/mllinbreg/l1-lam0.03_m100_uniform0.01_seed0_8a74aa3c",
    ("+experiment=table1_resnet18",): "cifar10/resnet18/mllinbreg/l1-lam0.03_m100_uniform0.01_seed0_d25f079a",
    # dataset.augment came later (LATER_KEYS): at its old default the name it had before
    ("dataset=synthetic", "dataset.augment=false"): "synthetic/mlp/mllinbreg/l1-lam0.03_m100_uniform0.01_seed0_85844321",
    ("dataset=synthetic", "dataset.augment=true"): "synthetic/mlp/mllinbreg/l1-lam0.03_m100_uniform0.01_seed0_f641e42f",
}

# keys that change how a run is executed, not its result: the same name whatever their value
EXECUTION = [
    "device=cpu",
    "wait_for_lock=true",
    "progress=true",
    "logger=tensorboard",
    "checkpoint_every=3",
    "num_threads=2",
    "resume=false",
    "eval_batch_size=17",
    "dataset.num_workers=2",
    "compile_optimizer=false",
]

METRICS = [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_acc_pct",
    "test_loss",
    "test_acc_pct",
    "sparsity_pct",
    "sparsity_all_params_pct",
    "conv_sparsity_pct",
    "nonzeros",
    "prunable_params",
    "fine_steps",
    "coarse_steps",
    "train_gflops",
    "train_flops_vs_sgd",
    "inference_flops_vs_dense",
    "epoch_s",
    "forward_s",
    "backward_s",
    "optimizer_s",
    "swap_s",
    "eval_s",
    "model_bytes_dense",
    "model_bytes_sparse",
]
LAYERS = ["epoch", "layer", "kind", "shape", "numel", "nonzeros", "density", "kernels", "zero_kernels"]
SUMMARY = [
    "dataset",
    "model",
    "method",
    "regularizer",
    "lam",
    "m",
    "init",
    "init_density",
    "target_sparsity",
    "init_scale",
    "lr",
    "momentum",
    "epochs",
    "batch_size",
    "seed",
    "step",
    *METRICS[3:],
    "run_name",
    "status",
]
STATUS = ["backend", "device", "epoch", "final", "run_key", "status", "step", "updated"]
FILES = {
    "checkpoint.pt",
    "config.yaml",
    "env.json",
    "layers.csv",
    "metrics.csv",
    "model.pt",
    "status.json",
    "summary.csv",
    ".lock",
}  # .lock: the run directory's lock, empty once released


@pytest.mark.parametrize("overrides", list(NAMES), ids=lambda o: " ".join(o))
def test_run_names_never_change(overrides):
    assert run_name(make_cfg(*overrides)) == NAMES[overrides]


def test_execution_keys_do_not_name_the_run():
    base = ("method=mllinbreg",)
    for override in EXECUTION:
        assert run_name(make_cfg(*base, override)) == NAMES[base], override


def _header(path):
    with open(path, newline="") as f:
        return next(csv.reader(f))


@pytest.mark.parametrize("method", ["sgd", "linbreg", "mllinbreg", "rigl", "prune_finetune", "set", "static", "gmp"])
def test_run_directory_files_and_columns_never_change(method, tmp_path):
    extra = ["sparsity=0.9"] if method not in ("sgd", "linbreg", "mllinbreg") else []
    cfg = make_cfg("dataset=digits", "model=mlp", "model.hidden=[16]", "epochs=2", "backend=torch", f"method={method}", *extra)
    run = tmp_path / run_name(cfg)
    assert train(cfg, run)["status"] == "finished"
    assert {p.name for p in run.iterdir() if p.is_file()} == FILES
    assert _header(run / "metrics.csv") == METRICS
    assert _header(run / "layers.csv") == LAYERS
    assert _header(run / "summary.csv") == SUMMARY
    status = json.loads((run / "status.json").read_text())
    assert sorted(status) == STATUS and status["status"] == "finished"
    assert status["run_key"].endswith(":" + run_name(cfg))
    with open(run / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)  # tensors and plain values
    assert {"run_key", "model", "method", "scheduler", "flops", "rng", "backend", "position"} <= set(ckpt)
